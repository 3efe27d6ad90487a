"""The PostgreSQL driver: pg_dump/pg_basebackup backups, WAL archiving through wal-push/wal-fetch.

The entry point names ``DESCRIPTOR``; ``drivers.postgres.driver`` (psycopg, a dozen modules) is
imported only when a job's driver is created."""

from backupd.descriptor import WAL_ARCHIVING, DriverDescriptor
from drivers.postgres.options import PostgresOptions
from drivers.postgres.walnames import WAL_NAMING

DESCRIPTOR = DriverDescriptor(
    name="postgres",
    options_model=PostgresOptions,
    methods=("logical", "physical"),
    driver="drivers.postgres.driver:PostgresDriver",
    capabilities=frozenset({WAL_ARCHIVING}),
    log_namings=(WAL_NAMING,),
)
