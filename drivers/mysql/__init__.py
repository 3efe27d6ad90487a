"""The MySQL/MariaDB driver (entry point ``mysql``)."""

from drivers.mysql.driver import MysqlDriver

__all__ = ["MysqlDriver"]
