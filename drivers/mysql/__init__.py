"""The MySQL/MariaDB driver: mysqldump/mariadb-dump and mariadb-backup, binlog archiving for PITR.

The entry point names ``DESCRIPTOR``; ``drivers.mysql.driver`` is imported only when a job's driver is created."""

from backupd.descriptor import INCREMENTAL_BACKUP, DriverDescriptor
from drivers.mysql.options import MysqlOptions

DESCRIPTOR = DriverDescriptor(
    name="mysql",
    options_model=MysqlOptions,
    methods=("logical", "physical"),
    driver="drivers.mysql.driver:MysqlDriver",
    capabilities=frozenset({INCREMENTAL_BACKUP}),  # diff and incr for method physical (mariadb-backup)
)
