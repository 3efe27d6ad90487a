"""Connecting to PostgreSQL without ever putting the password in argv or logs.

In-process connections get the password as a keyword; child tools read it from
a 0600 passfile named by PGPASSFILE, removed when the tool is done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from backupd.errors import DriverError, UsageError
from backupd.redact import redact
from backupd.settings import read_secret_file

PG_LIB = Path("/usr/lib/postgresql")


@dataclass
class Conn:
    """Connection parameters without the password, plus where the password comes from."""

    params: dict[str, Any]
    password_file: Path | None = None
    _password: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str, password_file: Path | None = None, what: str = "dsn") -> "Conn":
        try:
            params = conninfo_to_dict(url)
        except Exception as exc:
            raise UsageError(f"{what}: not a valid PostgreSQL URL ({redact(str(exc))})") from None
        if params.pop("password", None):
            raise UsageError(f"{what}: the URL carries a password; pass it in a password file instead")
        return cls(params, password_file)

    @property
    def password(self) -> str | None:
        if self._password is None and self.password_file is not None:
            self._password = read_secret_file(self.password_file, "password_file")
        return self._password

    @property
    def dbname(self) -> str:
        return str(self.params.get("dbname") or self.params.get("user") or "postgres")

    def with_db(self, dbname: str) -> "Conn":
        return Conn({**self.params, "dbname": dbname}, self.password_file, self._password)

    def conninfo(self) -> str:
        """For a tool's -d: every parameter except the password."""
        return make_conninfo(**{k: v for k, v in self.params.items() if v is not None})

    def describe(self) -> str:
        host = self.params.get("host") or "local socket"
        return f"{self.params.get('user') or '(default user)'}@{host}:{self.params.get('port') or 5432}/{self.dbname}"

    def connect(self, autocommit: bool = True, **kwargs: Any) -> psycopg.Connection:
        extra: dict[str, Any] = {"password": self.password} if self.password else {}
        try:
            return psycopg.connect(self.conninfo(), autocommit=autocommit, connect_timeout=10, **extra, **kwargs)
        except psycopg.Error as exc:
            raise DriverError(f"cannot connect to {self.describe()}: {redact(str(exc)).strip()}") from None

    @contextlib.contextmanager
    def tool_env(self, spool: Path | None = None) -> Iterator[dict[str, str]]:
        """Environment for a child tool: PGPASSFILE to a private 0600 file when there is a password."""
        env = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "PGPASSFILE")}
        env.setdefault("PGAPPNAME", "backupd")
        if not self.password:
            yield env
            return
        fd, name = tempfile.mkstemp(prefix=".pgpass-", dir=spool)
        try:
            escaped = self.password.replace("\\", "\\\\").replace(":", "\\:")
            os.write(fd, f"*:*:*:*:{escaped}\n".encode())
            os.fchmod(fd, 0o600)
            os.close(fd)
            env["PGPASSFILE"] = name
            yield env
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


def one(cursor: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    """The one row a query always returns (an aggregate, a function call)."""
    row = cursor.fetchone()
    if row is None:
        raise DriverError("PostgreSQL returned no row where one is always expected")
    return row


def find_tool(name: str, bin_dir: Path | str | None = None, major: int | None = None) -> str:
    """The tool's path: bin_dir, else the server's major version under /usr/lib/postgresql, else PATH."""
    candidates: list[Path] = []
    if bin_dir is not None:
        candidates.append(Path(bin_dir) / name)
    if major is not None:
        candidates.append(PG_LIB / str(major) / "bin" / name)
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return str(candidate)
    if bin_dir is None:
        if found := shutil.which(name):
            return found
        versions = sorted((p for p in PG_LIB.glob("*/bin") if (p / name).exists()), key=lambda p: p.parent.name)
        if versions:
            return str(versions[-1] / name)
    where = f" in {bin_dir}" if bin_dir else " on PATH"
    raise DriverError(f"{name}: not found{where}", hint="install the PostgreSQL client tools or set bin_dir")
