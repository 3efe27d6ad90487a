"""The Redis driver: RDB snapshots taken through the replication protocol."""

from drivers.redis.driver import RedisDriver, RedisOptions

__all__ = ["RedisDriver", "RedisOptions"]
