"""Fast paths for the commands PostgreSQL runs once per WAL file, before argparse or any heavy import.

``wal-push`` hands the file to a running daemon and ``wal-fetch`` takes a
prefetched file from the spool. Both need only ``daemon.state_dir``, so the
configuration is scanned for that one key instead of being parsed, validated
and turned into plugins: a call costs little more than starting Python. Only
``os``, ``sys`` and ``_socket`` are imported here.

``run()`` returns an exit status, or None whenever anything is unusual (other
options, an odd configuration, no daemon, a file not spooled): the full
command then runs and reports problems properly, so the fast path can only
ever be faster, never different.
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
COMMANDS = ("wal-push", "wal-fetch")
BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
PUSH_TIMEOUT = 600.0
ASK_TIMEOUT = 5.0  # how long wal-fetch waits for the running prefetcher before fetching itself
LOW_WATER = 8  # spooled segments ahead of replay below which a new prefetcher is started


class Call:
    """A ``wal-push``/``wal-fetch`` command line of the usual shape."""

    def __init__(self, command: str, config: str | None, args: list[str], job: str | None) -> None:
        self.command, self.config, self.args, self.job = command, config, args, job


def parse(argv: list[str]) -> Call | None:
    config = None
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        option, eq, value = argv[i].partition("=")
        if option not in GLOBAL_OPTIONS:
            return None
        if not eq:
            i += 1
            if i >= len(argv):
                return None
            value = argv[i]
        if option == "--config":
            config = value
        i += 1
    if i >= len(argv) or argv[i] not in COMMANDS:
        return None
    command, rest = argv[i], argv[i + 1:]
    args: list[str] = []
    job = None
    i = 0
    while i < len(rest):
        option, eq, value = rest[i].partition("=")
        if option == "--job":
            if not eq:
                i += 1
                if i >= len(rest):
                    return None
                value = rest[i]
            job = value
        elif rest[i].startswith("-"):
            return None  # --no-daemon, --help, the prefetcher's own options: the full command
        else:
            args.append(rest[i])
        i += 1
    if len(args) != (1 if command == "wal-push" else 2):
        return None
    return Call(command, config, args, job)


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


#: Set when a daemon took a request and gave no answer: the full command then pushes without asking again.
daemon_failed = False


def _request(path: str, payload: bytes, timeout: float) -> bytes | None:
    import _socket

    global daemon_failed
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError:
            return None  # no daemon there
        daemon_failed = True
        sock.sendall(payload)
        sock.shutdown(_socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        daemon_failed = not reply
        return reply
    except OSError:  # it hung up or timed out: the full command pushes itself
        return None
    finally:
        sock.close()


def wal_push(call: Call) -> int | None:
    state = state_dir(call.config)
    path = _json_string(os.path.abspath(call.args[0]))
    job = _json_string(call.job) if call.job else None
    if state is None or path is None or (call.job and job is None):
        return None
    message = '{"op": "wal-push", "path": ' + path + (', "job": ' + job if job else "") + "}\n"
    reply = _request(os.path.join(state, SOCKET_NAME), message.encode(), PUSH_TIMEOUT)
    return 0 if reply is not None and reply.startswith(OK_REPLY) else None


def wal_fetch(call: Call) -> int | None:
    name, dest = call.args
    state = state_dir(call.config)
    if call.job is None or state is None or not (spool.is_segment(name) or spool.is_history(name)):
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
    if spool.is_segment(name) and spool.segments_ahead(directory, name) < LOW_WATER:
        spool.start_prefetcher(directory, config_path(call.config), call.job, name, after=True)
    return 0


def run(argv: list[str]) -> int | None:
    call = parse(argv)
    if call is None:
        return None
    return wal_push(call) if call.command == "wal-push" else wal_fetch(call)
