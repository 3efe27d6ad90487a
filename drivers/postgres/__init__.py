"""PostgreSQL driver plugin (entry point ``postgres = "drivers.postgres:PostgresDriver"``)."""

from drivers.postgres.driver import PostgresDriver

__all__ = ["PostgresDriver"]
