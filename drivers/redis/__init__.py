"""The Redis driver: RDB snapshots taken through the replication protocol.

The entry point names ``DESCRIPTOR``; ``drivers.redis.driver`` is imported only when a job's driver is created."""

from backupd.descriptor import DriverDescriptor
from drivers.redis.options import RedisOptions

DESCRIPTOR = DriverDescriptor(
    name="redis",
    options_model=RedisOptions,
    methods=("rdb",),
    driver="drivers.redis.driver:RedisDriver",
)
