"""Talking to a server: credentials files, SQL connections, the native tools.

The password reaches the native tools only through a 0600 option file named by
``--defaults-extra-file`` (never argv, never the password environment variable), and reaches PyMySQL
as a keyword argument. Every child's exit status is checked by ``Tool``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import pymysql
import pymysql.cursors

from backupd.errors import DriverError
from backupd.redact import redact
from backupd.settings import read_secret_file
from drivers.mysql.options import Endpoint

TOOL_NAMES = {
    "dump": ("mariadb-dump", "mysqldump"),
    "client": ("mariadb", "mysql"),
    "binlog": ("mariadb-binlog", "mysqlbinlog"),
    "backup": ("mariadb-backup", "mariabackup", "xtrabackup"),
    "stream": ("mbstream", "xbstream"),
    "server": ("mariadbd", "mysqld"),
    "install_db": ("mariadb-install-db", "mysql_install_db"),
}
STDERR_TAIL = 4000
#: Pipe buffer for a tool's stdin/stdout (Linux default 64 KiB; 1 MiB is the unprivileged maximum):
#: the tool writes ahead while backupd compresses, and both sides wake 16 times less often.
PIPE_SIZE = 1 << 20


def find_tool(kind: str) -> str:
    names = TOOL_NAMES[kind]
    for name in names:
        path = shutil.which(name) or (shutil.which(name, path="/usr/sbin:/usr/local/sbin") if kind == "server" else None)
        if path:
            return path
    raise DriverError(f"{' or '.join(names)}: not found on PATH", hint="install the MariaDB/MySQL client tools")


def tool_version(kind: str) -> str:
    path = find_tool(kind)
    proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if proc.returncode == 0 else "unknown"


class Credentials:
    """Who to connect as; the password is read from its file when needed."""

    def __init__(self, endpoint: Endpoint, password_file: Path | None) -> None:
        self.endpoint = endpoint
        self.password_file = password_file

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        return read_secret_file(self.password_file, "password_file")

    def connect(self, database: str | None = None, **kwargs: Any) -> pymysql.connections.Connection:
        ep = self.endpoint
        try:
            return pymysql.connect(
                host=ep.host, port=ep.port, user=ep.user, password=self.password() or "",
                unix_socket=ep.socket, database=database, autocommit=True, charset="utf8mb4",
                connect_timeout=10, **kwargs,
            )
        except pymysql.err.OperationalError as exc:
            code, message = (exc.args + ("",))[:2]
            raise DriverError(f"{ep}: cannot connect: {message or exc} (error {code})",
                              hint="check the dsn and password_file" if code == 1045 else None) from None

    @contextlib.contextmanager
    def defaults_file(self, directory: Path | None = None) -> Iterator[Path]:
        """A 0600 ``[client]`` option file for the native tools, removed afterwards."""
        ep = self.endpoint
        lines = ["[client]", f"user={_quote(ep.user)}"]
        password = self.password()
        if password is not None:
            lines.append(f"password={_quote(password)}")
        if ep.socket:
            lines.append(f"socket={_quote(ep.socket)}")
        else:
            lines += [f"host={_quote(ep.host)}", f"port={ep.port}", "protocol=TCP"]
        fd, name = tempfile.mkstemp(prefix=".backupd-my-", suffix=".cnf", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write("\n".join(lines) + "\n")
            yield Path(name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def query(conn: pymysql.connections.Connection, sql: str, args: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
    with conn.cursor() as cursor:
        cursor.execute(sql, args)
        return list(cursor.fetchall())


def scalar(conn: pymysql.connections.Connection, sql: str, args: Sequence[Any] | None = None) -> Any:
    rows = query(conn, sql, args)
    return rows[0][0] if rows else None


def variable(conn: pymysql.connections.Connection, name: str) -> str | None:
    rows = query(conn, "SHOW GLOBAL VARIABLES LIKE %s", (name,))
    return str(rows[0][1]) if rows else None


def quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def widen_pipe(fd: int, size: int = PIPE_SIZE) -> None:
    """Best effort: a bigger pipe buffer (Linux F_SETPIPE_SZ); the default stays where it cannot be raised."""
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setpipe is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, setpipe, size)


class Tool:
    """One native tool run as a child: argv list, stderr kept in a file, exit status checked."""

    def __init__(self, argv: Sequence[str], *, stdin: Any = subprocess.DEVNULL, stdout: Any = subprocess.PIPE,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.name = Path(self.argv[0]).name
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(self.argv, stdin=stdin, stdout=stdout, stderr=self._stderr,
                                         env=env, cwd=cwd)
        except OSError as exc:
            self._stderr.close()
            raise DriverError(f"{self.name}: cannot start: {exc}") from None
        for pipe in (self.proc.stdout, self.proc.stdin):
            if pipe is not None:
                widen_pipe(pipe.fileno())

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    @property
    def stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def stderr_text(self, limit: int = STDERR_TAIL) -> str:
        # pread: the child shares this file's offset, so never seek it
        fd = self._stderr.fileno()
        size = os.fstat(fd).st_size
        start = max(0, size - limit)
        return redact(os.pread(fd, size - start, start).decode(errors="replace"))

    def error_summary(self) -> str:
        lines = [line.strip() for line in self.stderr_text().splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower() or "denied" in line.lower()]
        return (errors or lines or ["no message"])[-1]

    def wait(self, timeout: float | None = None) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise DriverError(f"{self.name}: did not finish within {timeout:.0f}s; killed") from None

    def check(self, timeout: float | None = None, what: str = "") -> None:
        """Wait and raise DriverError naming the tool and its last error line unless it exited 0."""
        code = self.wait(timeout)
        if code != 0:
            how = f"was killed by signal {-code}" if code < 0 else f"exited {code}"
            raise DriverError(f"{self.name}{' (' + what + ')' if what else ''} {how}: {self.error_summary()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

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
