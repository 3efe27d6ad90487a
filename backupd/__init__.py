"""backupd: backup and point-in-time recovery for PostgreSQL, MySQL/MariaDB, MongoDB, Redis and SQLite."""

__version__ = "0.1.0"

__all__ = ["__version__"]
