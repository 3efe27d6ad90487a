"""A postgres job's own configuration keys."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator

from backupd.driver import DriverOptions

_PLAIN = "[A-Za-z0-9._~-]"  # characters that mean nothing to libpq's URL parser and need no decoding
_HOST = rf"(?:{_PLAIN}*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?"
#: Query parameters every libpq since PostgreSQL 10 knows (not password: that one is refused).
_KEYWORDS = ("host|hostaddr|port|dbname|user|passfile|connect_timeout|client_encoding|options|application_name|"
             "fallback_application_name|keepalives|keepalives_idle|keepalives_interval|keepalives_count|sslmode|"
             "sslcert|sslkey|sslrootcert|sslcrl|requirepeer|krbsrvname|service|target_session_attrs")
_PARAM = rf"(?:{_KEYWORDS})=[A-Za-z0-9._~/-]*"
#: URLs libpq certainly accepts, with no password: checked without importing psycopg (a logical backup's
#: start-up is part of its time). Any other URL is parsed by libpq, as the driver will.
PLAIN_DSN = re.compile(rf"postgres(?:ql)?://(?:{_PLAIN}+@)?{_HOST}(?:,{_HOST})*(?:/{_PLAIN}*)?"
                       rf"(?:\?{_PARAM}(?:&{_PARAM})*)?")


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
        if PLAIN_DSN.fullmatch(value):
            return value
        from psycopg.conninfo import conninfo_to_dict  # libpq parses the rest

        try:
            params = conninfo_to_dict(value)
        except Exception as exc:  # psycopg.ProgrammingError: not a valid connection string
            raise ValueError(f"not a valid connection URL: {exc}") from None
        if params.get("password"):
            raise ValueError("the URL carries a password; put it in password_file instead")
        return value
