"""The MySQL/MariaDB driver: mysqldump/mariadb-dump and mariadb-backup, binlog archiving for PITR.

The entry point names ``DESCRIPTOR``; ``drivers.mysql.driver`` is imported only when a job's driver is created."""

from backupd.descriptor import DriverDescriptor
from backupd.lognaming import LogNaming
from drivers.mysql.options import MysqlOptions

DESCRIPTOR = DriverDescriptor(
    name="mysql",
    options_model=MysqlOptions,
    methods=("logical", "physical"),
    driver="drivers.mysql.driver:MysqlDriver",
    # binlogs sort by name only within one server's folder
    log_namings=(LogNaming("binlog"),),
)
