"""A mongodb job's own configuration keys."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from backupd.driver import DriverOptions

SCHEMES = ("mongodb", "mongodb+srv")


class MongodbOptions(DriverOptions):
    dsn: str = Field(description="mongodb://user@host:port/?replicaSet=rs0&authSource=admin (no password)")
    password_file: Path | None = None
    databases: list[str] = Field(default_factory=list, description=(
        "restore only these databases (default: all); the dump holds the whole server, since mongodump's "
        "--oplog (point-in-time consistency) only works on full dumps"))
    oplog_interval: float = Field(default=60.0, gt=0, description="seconds between oplog slices")
    oplog_slice_max_bytes: int = Field(default=64 << 20, gt=0)
    mongod: str = Field(default="mongod", description="binary verification starts a scratch server with")
    mongod_readable: list[Path] = Field(default_factory=list, description=(
        "extra read-only paths the scratch mongod needs inside the verification sandbox (it sees /usr, a few "
        "/etc files and its scratch directory; a mongod outside /usr gets its own directory too)"))

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str) -> str:
        scheme = urlsplit(value).scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError(f"expected a mongodb:// or mongodb+srv:// URL, not {scheme or 'no'} scheme")
        return value
