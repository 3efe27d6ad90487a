"""Talking to a server: credentials files, SQL connections, where the native tools are.

The password reaches the native tools only through a 0600 option file named by
``--defaults-extra-file`` (never argv, never the password environment variable), and reaches PyMySQL
as a keyword argument. The tools run through ``backupd.tool``, which checks every exit status.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import pymysql
import pymysql.cursors

from backupd.errors import DriverError
from backupd.settings import read_secret_file
from backupd.tool import Tool, describe_status, find_tool, tool_version
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
#: Where Debian and most distributions keep the server binaries (not always on a user's PATH).
SERVER_DIRS = ("/usr/sbin", "/usr/local/sbin")
HINT = "install the MariaDB/MySQL client tools"


def tool_path(kind: str) -> str:
    """The path of the native tool of ``kind`` (a key of TOOL_NAMES)."""
    return find_tool(TOOL_NAMES[kind], dirs=SERVER_DIRS if kind == "server" else (), hint=HINT)


def version_of(kind: str) -> str:
    """The first line of the tool's ``--version``."""
    return tool_version(tool_path(kind))


#: A server error as the client prints it, without its text (which quotes the content).
_SERVER_ERROR = re.compile(r"ERROR (\d+)(?: \((\w+)\))?(?: at line (\d+))?")


class ContentRejected(DriverError):
    """A native tool refused the backup's content: a dump's SQL, binlog events, a physical copy's files.

    A restore fails with it like with any error (exit 1); verification turns it into a
    failed verification (exit 3) worded with ``brief``, which names the tool and the
    server's error number and line but quotes none of the content.
    """

    def __init__(self, message: str, brief: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.brief = brief


def check_content(tool: Tool, what: str, timeout: float | None = None) -> None:
    """Wait for a tool that consumes backup content; ContentRejected unless it exited 0."""
    code = tool.wait(timeout)
    if code != 0:
        match = _SERVER_ERROR.search(tool.stderr_text())
        brief = f"{tool.name} ({what}) {describe_status(code)}" + (f": {match[0]}" if match else "")
        raise ContentRejected(str(tool.failure(code, what)), brief)


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
        """A connection; over a unix socket without TLS, as the native clients connect there.

        PyMySQL 1.2 otherwise builds a TLS context with the system's CA store for every
        connection (30-100 ms of CPU) to offer TLS on a socket that never leaves the host.
        """
        ep = self.endpoint
        try:
            return pymysql.connect(
                host=ep.host, port=ep.port, user=ep.user, password=self.password() or "",
                unix_socket=ep.socket, database=database, autocommit=True, charset="utf8mb4",
                connect_timeout=10, ssl_disabled=bool(ep.socket), **kwargs,
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
