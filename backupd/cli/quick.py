"""``wal-push`` and ``wal-fetch``, the commands PostgreSQL runs once per WAL file: their one parser and fast paths.

Both are read here, by ``read()``, and never by argparse: a call costs little
more than starting Python. ``wal-push`` hands the file to a running daemon and
``wal-fetch`` takes a prefetched file from the spool; both need only
``daemon.state_dir``, so the configuration is scanned for that one key instead
of being parsed, validated and turned into plugins. Only ``os``, ``sys`` and
``_socket`` are imported here.

``run()`` returns an exit status, or the ``Call`` when the fast path cannot
finish it (other options, an odd configuration, no daemon, a file not spooled,
a refusal): ``backupd.cli.main`` then continues with the full command
(``wal_push_cmd``/``wal_fetch_cmd``) in the same process, on the same ``Call``,
which also carries what the daemon already answered, so it is never asked twice.
"""

from __future__ import annotations

import os
import sys

from backupd import spool

DEFAULT_CONFIG = "/etc/backupd/backupd.toml"  # = backupd.paths.DEFAULT_CONFIG (tests check)
DEFAULT_STATE_DIR = "/var/lib/backupd"  # = backupd.paths.DEFAULT_STATE_DIR
SOCKET_NAME = "control.sock"  # = backupd.control.SOCKET_NAME
OK_REPLY = b'{"ok": true'  # = backupd.control.OK_REPLY: the daemon writes "ok" first
GLOBAL_OPTIONS = ("--config", "--log-format", "--log-level")
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")  # = backupd.logs.LEVELS
COMMANDS = ("wal-push", "wal-fetch")
GLOBAL_USAGE = ("usage: backupd [-h] [--config PATH] [--log-format {json,console}] "
                "[--log-level {debug,info,warning,error}] [--version] COMMAND ...")
BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
PUSH_TIMEOUT = 600.0
ASK_TIMEOUT = 5.0  # how long wal-fetch waits for the running prefetcher before fetching itself
LOW_WATER = 8  # spooled segments ahead of replay below which a new prefetcher is started

#: One line each for ``backupd --help`` (argparse lists the commands; it never parses these two).
SUMMARY = {
    "wal-push": "archive one WAL file (PostgreSQL archive_command: wal-push %p)",
    "wal-fetch": "fetch one WAL file (PostgreSQL restore_command: wal-fetch %f %p)",
}
USAGE = {
    "wal-push": "usage: backupd wal-push [-h] [--job JOB] [--no-daemon] path",
    "wal-fetch": "usage: backupd wal-fetch [-h] [--job JOB] [name] [dest]",
}
HELP = {
    "wal-push": """
positional arguments:
  path         the file PostgreSQL names with %p (relative to its data directory)

options:
  -h, --help   show this help message and exit
  --job JOB    the postgres job; may be left out when only one archives WAL
  --no-daemon  upload directly, without asking a running daemon
""",
    "wal-fetch": """
positional arguments:
  name        the WAL file name (%f)
  dest        where to write it (%p)

options:
  -h, --help  show this help message and exit
  --job JOB   the postgres job; may be left out when only one archives WAL
""",
}
#: Options taking a value, per command (``--prefetch-*`` and ``--lock-fd`` are the detached prefetcher's own).
VALUE_OPTIONS = {
    "wal-push": ("--job",),
    "wal-fetch": ("--job", "--prefetch-from", "--prefetch-after", "--lock-fd"),
}
FLAGS = {"wal-push": ("--no-daemon",), "wal-fetch": ()}


class UsageError(Exception):
    """A command line these commands do not take: the usage line and the message, exit 2 (as argparse)."""

    def __init__(self, command: str | None, message: str) -> None:
        super().__init__(message)
        self.command = command


class HelpRequested(Exception):
    def __init__(self, command: str) -> None:
        self.command = command


class Call:
    """One ``wal-push``/``wal-fetch`` command line, read; what the daemon answered, once asked."""

    def __init__(self, command: str, config: str | None, args: list[str], job: str | None, *,
                 log_format: str | None = None, log_level: str = "info", options: dict[str, str] | None = None,
                 no_daemon: bool = False) -> None:
        self.command, self.config, self.args, self.job = command, config, args, job
        self.log_format, self.log_level = log_format, log_level
        options = options or {}
        self.prefetch_from = options.get("--prefetch-from")
        self.prefetch_after = options.get("--prefetch-after")
        self.lock_fd = int(options["--lock-fd"]) if "--lock-fd" in options else None
        self.no_daemon = no_daemon
        #: absolute socket path -> the daemon's reply
        #: (b"": it took the request and gave no answer; None: nobody listened there)
        self.answers: dict[str, bytes | None] = {}

    @property
    def fast(self) -> bool:
        """Of the usual shape PostgreSQL runs, which the fast path may finish."""
        if self.no_daemon or self.prefetch_from or self.prefetch_after or self.lock_fd is not None:
            return False
        return len(self.args) == (1 if self.command == "wal-push" else 2)


def read(argv: list[str]) -> Call:
    """The command line, read as the full grammar of these two commands; UsageError or HelpRequested."""
    globals_: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        option, eq, value = argv[i].partition("=")
        if option not in GLOBAL_OPTIONS:
            raise UsageError(None, f"unrecognized arguments: {argv[i]}")
        if not eq:
            i += 1
            if i >= len(argv):
                raise UsageError(None, f"argument {option}: expected one argument")
            value = argv[i]
        globals_[option] = value
        i += 1
    if i >= len(argv) or argv[i] not in COMMANDS:
        raise UsageError(None, f"not one of {', '.join(COMMANDS)}: {argv[i] if i < len(argv) else '(none)'}")
    log_format, log_level = globals_.get("--log-format"), globals_.get("--log-level", "info")
    if log_format is not None and log_format not in LOG_FORMATS:
        raise UsageError(None, f"argument --log-format: invalid choice: {log_format!r} (choose from json, console)")
    if log_level not in LOG_LEVELS:
        raise UsageError(None, f"argument --log-level: invalid choice: {log_level!r} "
                               f"(choose from {', '.join(LOG_LEVELS)})")
    command, rest = argv[i], argv[i + 1:]
    args: list[str] = []
    options: dict[str, str] = {}
    no_daemon = False
    i = 0
    while i < len(rest):
        word = rest[i]
        option, eq, value = word.partition("=")
        if word in ("-h", "--help"):
            raise HelpRequested(command)
        if option in VALUE_OPTIONS[command]:
            if not eq:
                i += 1
                if i >= len(rest) or rest[i].startswith("-"):
                    raise UsageError(command, f"argument {option}: expected one argument")
                value = rest[i]
            options[option] = value
        elif word in FLAGS[command]:
            no_daemon = True
        elif word.startswith("-") and word != "-":
            raise UsageError(command, f"unrecognized arguments: {word}")
        else:
            args.append(word)
        i += 1
    wanted = 1 if command == "wal-push" else 2
    if len(args) > wanted:
        raise UsageError(command, f"unrecognized arguments: {' '.join(args[wanted:])}")
    if command == "wal-push" and not args:
        raise UsageError(command, "the following arguments are required: path")
    if "--prefetch-from" in options and "--prefetch-after" in options:
        raise UsageError(command, "argument --prefetch-after: not allowed with argument --prefetch-from")
    if "--lock-fd" in options and not options["--lock-fd"].isdigit():
        raise UsageError(command, f"argument --lock-fd: invalid int value: {options['--lock-fd']!r}")
    return Call(command, globals_.get("--config"), args, options.get("--job"), log_format=log_format,
                log_level=log_level, options=options, no_daemon=no_daemon)


def parse(argv: list[str]) -> Call | None:
    """The call the fast path may finish; None for anything else (``read`` tells what)."""
    try:
        call = read(argv)
    except (UsageError, HelpRequested):
        return None
    return call if call.fast else None


def config_path(config: str | None) -> str:
    return os.path.abspath(config or os.environ.get("BACKUPD_CONFIG") or DEFAULT_CONFIG)


def state_dir(config: str | None) -> str | None:
    """``daemon.state_dir`` as the full configuration would resolve it; None when unsure."""
    override = None
    for key, value in os.environ.items():
        upper = key.upper()
        if upper == "BACKUPD_DAEMON":
            return None  # the whole table as JSON: leave it to pydantic-settings
        if upper == "BACKUPD_DAEMON__STATE_DIR":
            override = value
    if override:
        return override
    try:
        with open(config_path(config), encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError):
        return None
    found = scan_state_dir(text)
    # A file broken by an edit must not stop WAL archiving while the daemon runs on its last good
    # configuration: a looser reading finds the daemon (a wrong guess finds no socket, and the full
    # command then reports the broken file, exit 2).
    return found if found is not None else scan_state_dir(text, lenient=True)


def scan_state_dir(text: str, *, lenient: bool = False) -> str | None:
    """``daemon.state_dir`` of a TOML document written the usual way; None when unsure.

    Understands tables, dotted keys, comments, single-line strings and
    multi-line arrays. Anything it might misread (multi-line strings, quoted
    keys, an inline ``daemon`` table, a line it cannot place) gives None, and
    the caller parses the file properly instead. ``lenient`` (for a file with a syntax
    error elsewhere) skips whatever it cannot place and answers only with a plain
    ``state_dir`` under a ``[daemon]`` table.
    """
    if '"""' in text or "'''" in text:
        return None
    table = ""
    depth = 0  # brackets left open by a multi-line value
    found: str | None = None
    for raw in text.splitlines():
        scanned = _scan_line(raw)
        if scanned is None:
            if lenient:
                depth = 0
                continue
            return None
        code, delta = scanned
        if depth:
            depth += delta
            if depth < 0:
                return None
            continue
        code = code.strip()
        if not code:
            continue
        if code.startswith("["):
            many = code.startswith("[[")
            name = _dotted(code[2:-2] if many else code[1:-1]) if code.endswith("]]" if many else "]") else None
            if name is None or (many and (name == "daemon" or name.startswith("daemon."))):
                if lenient:
                    table = "?"  # a broken header: what follows belongs to no table we know
                    continue
                return None
            table = name
            continue
        key, eq, value = code.partition("=")
        key_name = _dotted(key)
        if not eq or key_name is None:
            if lenient:
                continue
            return None
        full = f"{table}.{key_name}" if table else key_name
        if full == "daemon" or full.startswith("daemon.state_dir."):
            return None
        if full == "daemon.state_dir":
            if found is not None:
                return None
            found = _plain_string(value.strip())
            if found is None:
                return None
        depth = _scan_line(value)[1] if "[" in value or "{" in value else 0  # type: ignore[index]
        if depth < 0:
            return None
    if lenient:
        return found
    if depth:
        return None
    return found if found is not None else DEFAULT_STATE_DIR


def _scan_line(line: str) -> tuple[str, int] | None:
    """The line without its comment, and the brackets it leaves open; None for an unterminated string."""
    quote = ""
    escaped = False
    delta = 0
    for index, char in enumerate(line):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\" and quote == '"':
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "#":
            return line[:index], delta
        elif char in "[{":
            delta += 1
        elif char in "]}":
            delta -= 1
    if quote:
        return None
    return line, delta


def _dotted(name: str) -> str | None:
    parts = [part.strip() for part in name.split(".")]
    if not all(part and BARE.issuperset(part) for part in parts):
        return None
    return ".".join(parts)


def _plain_string(value: str) -> str | None:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        inner = value[1:-1]
        if value[0] not in inner and "\\" not in inner:
            return inner
    return None


def _json_string(text: str) -> str | None:
    if any(ord(char) < 0x20 or 0xD800 <= ord(char) <= 0xDFFF for char in text):
        return None
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _request(path: str, payload: bytes, timeout: float) -> bytes | None:
    """The daemon's reply: None when nobody listens at ``path``, b"" when it took the request and gave no
    answer (hung up, timed out: the full command then pushes itself without asking again)."""
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError:
            return None  # no daemon there
        reply = b""
        sock.sendall(payload)
        sock.shutdown(_socket.SHUT_WR)
        while chunk := sock.recv(65536):
            reply += chunk
        return reply
    except OSError:
        return b""
    finally:
        sock.close()


def wal_push(call: Call) -> int | None:
    state = state_dir(call.config)
    path = _json_string(os.path.abspath(call.args[0]))
    job = _json_string(call.job) if call.job else None
    if state is None or path is None or (call.job and job is None):
        return None
    message = '{"op": "wal-push", "path": ' + path + (', "job": ' + job if job else "") + "}\n"
    socket = os.path.join(state, SOCKET_NAME)
    reply = call.answers[os.path.abspath(socket)] = _request(socket, message.encode(), PUSH_TIMEOUT)
    return 0 if reply is not None and reply.startswith(OK_REPLY) else None


def wal_fetch(call: Call) -> int | None:
    name, dest = call.args
    state = state_dir(call.config)
    if call.job is None or state is None or not spool.servable(name):
        return None
    directory = spool.directory(state, call.job)
    dest = os.path.abspath(dest)
    try:
        found: bool | None = spool.deliver(directory, name, dest)
        if not found:
            if spool.absent(directory, name):
                found = False
            elif spool.prefetcher_running(directory):
                found = spool.ask(directory, name, dest, ASK_TIMEOUT)
            else:
                found = None
    except OSError:
        return None
    if found is None:
        return None
    spool.touch(directory)
    if not found:
        print(f"backupd: {name}: not in the archive of job {call.job}", file=sys.stderr)
        return 1
    if spool.ahead(directory, name) < LOW_WATER:  # the driver's prefetcher knows what follows (if anything)
        spool.start_prefetcher(directory, config_path(call.config), call.job, name, after=True)
    return 0


def run(argv: list[str]) -> int | Call:
    """An exit status when done here (the fast path, a usage error, help); else the Call to continue with."""
    try:
        call = read(argv)
    except HelpRequested as asked:
        print(USAGE[asked.command] + "\n" + HELP[asked.command], end="")
        return 0
    except UsageError as exc:
        usage = USAGE[exc.command] if exc.command else GLOBAL_USAGE
        print(f"{usage}\nbackupd{' ' + exc.command if exc.command else ''}: error: {exc}", file=sys.stderr)
        return 2
    if call.fast:
        code = wal_push(call) if call.command == "wal-push" else wal_fetch(call)
        if code is not None:
            return code
    return call
