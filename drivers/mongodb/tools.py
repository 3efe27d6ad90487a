"""Running mongodump and mongorestore: argv, the 0600 --config file, streams, exit statuses.

The connection string and password reach the tools only through a YAML file
given with ``--config`` (mongo-tools read ``uri`` and ``password`` from it),
created 0600 in the job's spool directory and removed afterwards, so neither
appears in argv (``ps``) nor in logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import IO, Iterator, Sequence

from backupd.errors import DriverError
from backupd.redact import redact

STDERR_TAIL = 2000
COPY_CHUNK = 1 << 20


def find_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise DriverError(f"{name}: not found on PATH", hint="install the MongoDB Database Tools (mongodump, mongorestore)")
    return path


def tool_version(name: str) -> str:
    """``mongodump --version`` -> "100.9.4" (the first line's last word)."""
    proc = subprocess.run([find_tool(name), "--version"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise DriverError(f"{name} --version exited with status {proc.returncode}: {_tail(proc.stderr)}")
    first = (proc.stdout.strip().splitlines() or [""])[0]
    return first.split()[-1] if first else "unknown"


@contextlib.contextmanager
def config_file(directory: Path, uri: str, password: str | None) -> Iterator[Path]:
    """A 0600 YAML file holding ``uri`` (and ``password``), removed on exit."""
    path = directory / f".mongo-tools-{uuid.uuid4().hex[:12]}.yaml"
    lines = [f"uri: {json.dumps(uri)}"]  # a JSON string is a valid YAML double-quoted scalar
    if password is not None:
        lines.append(f"password: {json.dumps(password)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def dump_argv(config: Path, *, oplog: bool, namespaces: Sequence[str] = ()) -> list[str]:
    argv = [find_tool("mongodump"), f"--config={config}", "--archive"]
    if oplog:
        argv.append("--oplog")
    argv += [f"--nsInclude={ns}" for ns in namespaces]
    return argv


def restore_argv(config: Path, *, archive: bool = True, oplog_replay: bool = False, oplog_limit: str | None = None,
                 namespaces: Sequence[str] = (), drop: bool = False, directory: Path | None = None,
                 jobs: int = 1) -> list[str]:
    argv = [find_tool("mongorestore"), f"--config={config}"]
    if archive:
        argv.append("--archive")
    if oplog_replay:
        argv.append("--oplogReplay")
    if oplog_limit:
        argv.append(f"--oplogLimit={oplog_limit}")
    argv += [f"--nsInclude={ns}" for ns in namespaces]
    if drop:
        argv.append("--drop")
    if jobs > 1:
        argv.append(f"--numParallelCollections={jobs}")
    argv.append("--stopOnError")
    if directory is not None:
        argv.append(f"--dir={directory}")
    return argv


class ToolProcess:
    """A child whose stderr goes to a file (no pipe to fill up) and whose status is always checked."""

    def __init__(self, argv: list[str], *, stdin: int | None = None, stdout: int | None = None,
                 workdir: Path) -> None:
        self.name = Path(argv[0]).name
        self._stderr_path = workdir / f".{self.name}-{uuid.uuid4().hex[:8]}.stderr"
        self._stderr = open(self._stderr_path, "w+b")
        try:
            self.proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout if stdout is not None else subprocess.DEVNULL,
                                         stderr=self._stderr)
        except OSError as exc:
            self._close_stderr()
            raise DriverError(f"{self.name}: cannot start: {exc.strerror or exc}") from None

    def stderr_tail(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - STDERR_TAIL))
        return _tail(self._stderr.read().decode(errors="replace"))

    def finish(self, what: str) -> None:
        """Wait; a non-zero status raises DriverError with the tail of stderr (redacted)."""
        code = self.proc.wait()
        try:
            if code != 0:
                raise DriverError(f"{self.name} exited with status {code} {what}: {self.stderr_tail()}")
        finally:
            self._close_stderr()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_stderr()

    def _close_stderr(self) -> None:
        if not self._stderr.closed:
            self._stderr.close()
        with contextlib.suppress(FileNotFoundError):
            self._stderr_path.unlink()


def feed_stdin(process: ToolProcess, source: IO[bytes]) -> int:
    """Copy ``source`` into the child's stdin; return the byte count. A closed pipe means the child failed."""
    stdin = process.proc.stdin
    assert stdin is not None
    size = 0
    try:
        while chunk := source.read(COPY_CHUNK):
            stdin.write(chunk)
            size += len(chunk)
        stdin.close()
    except BrokenPipeError:
        pass  # the child exited early; finish() reports its status and stderr
    return size


def _tail(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return redact(" | ".join(lines[-3:]))[-STDERR_TAIL:] or "(no output on stderr)"
