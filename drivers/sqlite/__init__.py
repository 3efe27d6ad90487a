"""The SQLite driver: consistent online copies through the sqlite3 backup API.

The entry point names ``DESCRIPTOR``; ``drivers.sqlite.driver`` is imported only when a job's driver is created."""

from backupd.descriptor import DriverDescriptor
from drivers.sqlite.options import SqliteOptions

DESCRIPTOR = DriverDescriptor(
    name="sqlite",
    options_model=SqliteOptions,
    methods=("logical",),
    driver="drivers.sqlite.driver:SqliteDriver",
)
