"""The mysql driver's job keys and its connection URL."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import Field, field_validator

from backupd.driver import DriverOptions
from backupd.timeutil import parse_duration

#: Schemas that are the server's own, never dumped as user data.
SYSTEM_SCHEMAS = frozenset({"mysql", "information_schema", "performance_schema", "sys"})


@dataclass(frozen=True)
class Endpoint:
    """Where a server listens and as whom to connect; never holds a password."""

    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    socket: str | None = None

    def __str__(self) -> str:
        where = f"socket {self.socket}" if self.socket else f"{self.host}:{self.port}"
        return f"mysql://{self.user}@{where}"


def parse_url(text: str, *, what: str = "dsn", default_user: str = "root") -> Endpoint:
    """``mysql://user@host:port/[?socket=/path]``; a password in the URL is refused."""
    parts = urlsplit(text)
    if parts.scheme not in ("mysql", "mariadb"):
        raise ValueError(f"{what} must be a mysql:// URL, e.g. mysql://backup@127.0.0.1:3306/")
    if parts.password is not None:
        raise ValueError(f"{what} must not contain a password; put it in a password file")
    try:
        port = parts.port or 3306
    except ValueError:
        raise ValueError(f"{what} has an invalid port") from None
    query = parse_qs(parts.query)
    unknown = set(query) - {"socket"}
    if unknown:
        raise ValueError(f"{what} has unknown parameters: {', '.join(sorted(unknown))} (known: socket)")
    if parts.path not in ("", "/"):
        raise ValueError(f"{what} names no database (got path {parts.path!r}); choose databases with `databases`")
    socket = query.get("socket", [None])[0]
    host = parts.hostname or ("localhost" if socket else "")
    if not host:
        raise ValueError(f"{what} has no host")
    return Endpoint(host=host, port=port, user=unquote(parts.username) if parts.username else default_user,
                    socket=socket)


class MysqlOptions(DriverOptions):
    dsn: str
    password_file: Path | None = None
    databases: list[str] = Field(default_factory=list, description="default: every user database")
    exclude_databases: list[str] = Field(default_factory=list)
    binlog_flush_interval: dt.timedelta = dt.timedelta(seconds=60)
    binlog_server_id: int = Field(default=0, ge=0, lt=2**32,
                                  description="server id the binlog streamer announces; 0 derives one from the job")

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str) -> str:
        parse_url(value)
        return value

    @field_validator("binlog_flush_interval", mode="before")
    @classmethod
    def _interval(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_duration(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value <= 0:
                raise ValueError("must be positive")
            return dt.timedelta(seconds=value)
        return value

    @field_validator("databases", "exclude_databases")
    @classmethod
    def _names(cls, values: list[str]) -> list[str]:
        for name in values:
            if not name or "`" in name or "/" in name:
                raise ValueError(f"not a database name: {name!r}")
        return values

    @property
    def endpoint(self) -> Endpoint:
        return parse_url(self.dsn)
