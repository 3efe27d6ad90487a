"""Running a native tool: the one way backupd starts a child process.

argv lists only (no shell), an explicit environment, stdin and stdout streamed,
stderr kept in an unlinked file (a chatty tool never blocks on a full pipe) and
summarised redacted, the exit status always checked and reported the same way
("pg_dump exited with status 1: ..." / "mariadbd was killed by signal SIGKILL: ...").
Every child is registered in ``backupd.children``, so cancelling a run or
stopping the daemon kills it. A ``Sandbox`` wraps the argv in bubblewrap.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Mapping, Sequence

from backupd import children
from backupd.errors import DriverError, IntegrityError
from backupd.redact import redact

if TYPE_CHECKING:
    from backupd.sandbox import Sandbox

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDERR_TAIL = 4000  #: bytes of stderr kept for messages
SUMMARY_LINES = 3
COPY_CHUNK = 1 << 20
#: Pipe buffer for a tool's stdin/stdout (Linux default 64 KiB; 1 MiB is the unprivileged maximum):
#: the tool writes ahead while backupd compresses, and both sides wake 16 times less often.
PIPE_SIZE = 1 << 20
_ERROR_WORDS = ("error", "fatal", "denied", "panic", "failed")


def find_tool(names: str | Sequence[str], *, dirs: Sequence[str | Path] = (), hint: str | None = None) -> str:
    """The first of ``names`` found in ``dirs`` (in order), else on PATH; DriverError naming them all."""
    candidates = [names] if isinstance(names, str) else list(names)
    for name in candidates:
        for directory in dirs:
            path = Path(directory) / name
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
        found = shutil.which(name)
        if found:
            return found
    where = f" in {', '.join(str(d) for d in dirs)} or on PATH" if dirs else " on PATH"
    raise DriverError(f"{' or '.join(candidates)}: not found{where}", hint=hint)


def tool_version(path: str, parse: Callable[[str], str] | None = None, args: Sequence[str] = ("--version",)) -> str:
    """``path --version``, parsed (default: the first line); DriverError when it cannot run.

    Read from stdout, or from stderr where the tool prints it there (mariadb-backup)."""
    with Tool([path, *args], stdout=PIPE) as tool:
        try:
            out, _ = tool.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            tool.kill()
            raise DriverError(f"{tool.name} --version did not finish within 30 s; killed") from None
        tool.check(what="--version")
        text = out.decode(errors="replace").strip() or tool.stderr_text().strip()
    if parse is not None:
        return parse(text)
    return (text.splitlines() or ["unknown"])[0]


def run_as_prefix(user: str | None) -> list[str]:
    """``runuser -u USER --`` when backupd is root and ``user`` is set; nothing otherwise."""
    if user and os.geteuid() == 0:
        return ["runuser", "-u", user, "--"]
    return []


def widen_pipe(fd: int, size: int = PIPE_SIZE) -> None:
    """Best effort: a bigger pipe buffer (Linux F_SETPIPE_SZ); the default stays where it cannot be raised."""
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setpipe is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, setpipe, size)


def describe_status(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"was killed by signal {name}"
    return f"exited with status {code}"


class Tool:
    """One native tool running as a child. A context manager: leaving it kills and reaps the child.

    ``stdin``/``stdout`` take PIPE, DEVNULL, a file object or a descriptor.
    ``user`` runs it as that OS user (root only, via runuser); ``sandbox`` runs it in bubblewrap.
    As a Readable (``read``), the child's stdout streams into a pipeline and a
    failed exit raises inside the consumer's read loop, so a truncated stream is
    never stored as good.
    """

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
                 stdin: Any = DEVNULL, stdout: Any = PIPE, user: str | None = None,
                 sandbox: "Sandbox | None" = None, name: str | None = None, keep_head: int = 0) -> None:
        argv = [str(arg) for arg in argv]
        self.name = name or Path(argv[0]).name
        self.argv = argv
        if sandbox is not None:
            full = sandbox.wrap(argv)
            env = sandbox.environment(env)
        else:
            full = [*run_as_prefix(user), *argv]
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(full, stdin=stdin, stdout=stdout, stderr=self._stderr,
                                         env=dict(env) if env is not None else None, cwd=cwd,
                                         start_new_session=False)
        except OSError as exc:
            self._stderr.close()
            raise DriverError(f"{self.name}: cannot start: {exc.strerror or exc}") from None
        children.register(self.proc, self.name)
        for pipe in (self.proc.stdout, self.proc.stdin):
            if pipe is not None:
                widen_pipe(pipe.fileno())
        self.size = 0
        self._keep_head = keep_head
        self.head = b""  #: the first ``keep_head`` bytes of stdout (a format's header)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    @property
    def stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    # -- stdout as a Readable ------------------------------------------------------------------

    def read(self, size: int = -1) -> bytes:
        """What the pipe holds now, up to ``size`` bytes (everything left for -1); b"" at the end.

        At most one raw read (``read1``), not ``read``'s loop that waits until ``size``
        bytes have come: the consumer (zstd) works on each piece while the tool writes the
        next. At the end the exit status is checked: a failure raises DriverError here.
        """
        stdout: Any = self.stdout  # a BufferedReader: read1 is its one-raw-read
        data = stdout.read1(size) if size and size > 0 else stdout.read()
        if data:
            if len(self.head) < self._keep_head:
                self.head += data[:self._keep_head - len(self.head)]
            self.size += len(data)
            return data
        self.check()
        return b""

    # -- stdin ---------------------------------------------------------------------------------

    def feed(self, source: Any, chunk: int = COPY_CHUNK) -> int:
        """Copy ``source`` (a Readable) into stdin and close it; return the bytes sent.

        A tool that stops reading (broken pipe) ends the copy quietly: its exit status says why.
        """
        sent = 0
        try:
            while data := source.read(chunk):
                self.stdin.write(data)
                sent += len(data)
            self.stdin.close()
        except BrokenPipeError:
            with contextlib.suppress(OSError):
                self.stdin.close()
        return sent

    # -- status --------------------------------------------------------------------------------

    def stderr_text(self, limit: int = STDERR_TAIL) -> str:
        """The last ``limit`` bytes of stderr, redacted."""
        fd = self._stderr.fileno()
        size = os.fstat(fd).st_size
        start = max(0, size - limit)
        # pread: the child shares this file's offset, so never seek it
        return redact(os.pread(fd, size - start, start).decode(errors="replace"))

    def stderr_summary(self) -> str:
        """The lines of stderr that say what went wrong (error lines first), joined on one line."""
        lines = [line.strip() for line in self.stderr_text().splitlines() if line.strip()]
        errors = [line for line in lines if any(word in line.lower() for word in _ERROR_WORDS)]
        chosen = (errors or lines)[-SUMMARY_LINES:]
        return " | ".join(chosen) or "no message on stderr"

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        """The exit status; past ``timeout`` the tool is killed and DriverError raised."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DriverError(f"{self.name} did not finish within {timeout:.0f} s; killed") from None
        children.unregister(self.proc)
        return code

    def failure(self, code: int, what: str = "") -> DriverError:
        return DriverError(f"{self.name}{' (' + what + ')' if what else ''} {describe_status(code)}: "
                           f"{self.stderr_summary()}")

    def check(self, timeout: float | None = None, what: str = "") -> None:
        """Wait; DriverError naming the tool, how it ended and its stderr unless it exited 0."""
        code = self.wait(timeout)
        if code != 0:
            raise self.failure(code, what)

    def check_content(self, what: str) -> None:
        """Wait, for a tool that reads restored content: a non-zero exit is the content's doing
        (IntegrityError: a failed verification); killed by a signal (a cancelled run) is DriverError."""
        code = self.wait()
        if code < 0:
            raise self.failure(code)
        if code != 0:
            raise IntegrityError(f"{what}: {self.failure(code)}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def kill(self) -> None:
        children.kill_tree(self.proc)
        children.unregister(self.proc)

    def close(self) -> None:
        self.kill()
        for stream in (self.proc.stdout, self.proc.stdin):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._stderr.close()

    def __enter__(self) -> "Tool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
        input: bytes | None = None, stdin: Any = DEVNULL, user: str | None = None,
        sandbox: "Sandbox | None" = None, timeout: float | None = None, name: str | None = None,
        what: str = "") -> str:
    """Run to completion and return stdout (text); DriverError naming the tool on any failure."""
    with Tool(argv, env=env, cwd=cwd, stdin=PIPE if input is not None else stdin, stdout=PIPE, user=user,
              sandbox=sandbox, name=name) as tool:
        try:
            out, _ = tool.proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            tool.kill()
            raise DriverError(f"{tool.name} did not finish within {timeout:.0f} s; killed") from None
        tool.check(what=what)
        return out.decode(errors="replace")


def feed(argv: Sequence[str], source: Any, *, env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
         user: str | None = None, sandbox: "Sandbox | None" = None, name: str | None = None, what: str = "") -> int:
    """Stream ``source`` into a tool's stdin; return the bytes sent; DriverError if the tool fails."""
    with Tool(argv, env=env, cwd=cwd, stdin=PIPE, stdout=DEVNULL, user=user, sandbox=sandbox, name=name) as tool:
        sent = tool.feed(source)
        tool.check(what=what)
        return sent
