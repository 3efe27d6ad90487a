"""The MongoDB driver: mongodump archives, oplog slices for PITR, mongorestore.

The entry point names ``DESCRIPTOR``; ``drivers.mongodb.driver`` is imported only when a job's driver is created."""

from backupd.descriptor import DriverDescriptor
from backupd.lognaming import LogNaming
from drivers.mongodb.options import MongodbOptions

DESCRIPTOR = DriverDescriptor(
    name="mongodb",
    options_model=MongodbOptions,
    methods=("logical",),
    driver="drivers.mongodb.driver:MongodbDriver",
    # slices are named <from>-<to>.bson with zero-padded timestamps: they sort in archive order
    log_namings=(LogNaming("oplog", ordered_across=True),),
)
