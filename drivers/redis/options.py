"""A redis job's own configuration keys."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from backupd.driver import DriverOptions
from drivers.redis.resp import parse_dsn


class RedisOptions(DriverOptions):
    dsn: str = Field(description="redis://[user@]host[:port], rediss:// for TLS, or unix:///path/to.sock")
    password_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    read_timeout: float = Field(default=60.0, gt=0, description="seconds without data from the server before failing")
    connect_timeout: float = Field(default=10.0, gt=0)
    redis_server: str = Field(default="redis-server", description="binary verification starts")
    load_timeout: float = Field(default=600.0, gt=0, description="seconds the scratch server may take to load")

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str) -> str:
        parse_dsn(value)
        return value
