"""The MongoDB driver: mongodump archives, oplog slices for PITR, mongorestore."""

from drivers.mongodb.driver import MongodbDriver, MongodbOptions

__all__ = ["MongodbDriver", "MongodbOptions"]
