"""A postgres job's own configuration keys."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from backupd.driver import DriverOptions


class PostgresOptions(DriverOptions):
    dsn: str
    password_file: Path | None = None
    #: The cluster's data directory; needed to push WAL ahead from pg_wal/archive_status.
    data_dir: Path | None = None
    #: Where pg_dump, pg_basebackup, initdb... live; default: the server's major version under
    #: /usr/lib/postgresql, else PATH.
    bin_dir: Path | None = None
    wal_push_workers: int = Field(default=4, ge=1, le=64)
    wal_prefetch: int = Field(default=16, ge=1, le=256)
    #: Workers of a physical backup or restore by the file engine (reading, compressing, encrypting,
    #: uploading in parallel); default: the number of cores.
    process_max: int | None = Field(default=None, ge=1, le=64)

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("expected a postgresql:// URL")
        from psycopg.conninfo import conninfo_to_dict  # libpq parses it; imported only to validate a dsn

        try:
            params = conninfo_to_dict(value)
        except Exception as exc:  # psycopg.ProgrammingError: not a valid connection string
            raise ValueError(f"not a valid connection URL: {exc}") from None
        if params.get("password"):
            raise ValueError("the URL carries a password; put it in password_file instead")
        return value
