"""What backupd asks a MongoDB server directly (pymongo): version, topology, oplog positions, tailing."""

from __future__ import annotations

import threading
from typing import Any, Iterator

from bson import CodecOptions, Timestamp
from bson.raw_bson import RawBSONDocument

from backupd.errors import DriverError
from backupd.redact import redact

AWAIT_MS = 1000


class MongoServer:
    def __init__(self, uri: str, password: str | None, *, timeout_ms: int = 10_000) -> None:
        import pymongo  # an optional dependency: backupd[mongodb]

        self._pymongo = pymongo
        kwargs: dict[str, Any] = {"serverSelectionTimeoutMS": timeout_ms, "connectTimeoutMS": timeout_ms,
                                  "appname": "backupd"}
        if password is not None:
            kwargs["password"] = password
        try:
            self.client = pymongo.MongoClient(uri, **kwargs)
        except pymongo.errors.PyMongoError as exc:
            raise DriverError(f"{redact(uri)}: {redact(str(exc))}") from None
        self.where = redact(uri)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "MongoServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, func: Any) -> Any:
        try:
            return func()
        except self._pymongo.errors.OperationFailure as exc:
            if exc.code in (18, 13):  # AuthenticationFailed, Unauthorized
                raise DriverError(f"{self.where}: {what}: authentication failed or not authorized: "
                                  f"{redact(str(exc.details.get('errmsg', exc)) if exc.details else str(exc))}",
                                  hint="check the job's password_file and the user's roles (backup, clusterMonitor)") from None
            raise DriverError(f"{self.where}: {what}: {redact(str(exc))}") from None
        except self._pymongo.errors.PyMongoError as exc:
            raise DriverError(f"{self.where}: {what}: {redact(str(exc))}") from None

    def version(self) -> str:
        return str(self._call("buildInfo", lambda: self.client.admin.command("buildInfo"))["version"])

    def replica_set(self) -> str | None:
        hello = self._call("hello", lambda: self.client.admin.command("hello"))
        return hello.get("setName")

    def _oplog(self, raw: bool = False) -> Any:
        options = CodecOptions(document_class=RawBSONDocument) if raw else CodecOptions()
        return self.client.local.get_collection("oplog.rs", codec_options=options)

    def _edge(self, direction: int) -> Timestamp | None:
        def find() -> Any:
            return self._oplog().find_one({}, {"ts": 1}, sort=[("$natural", direction)])
        doc = self._call("reading local.oplog.rs", find)
        return doc["ts"] if doc else None

    def newest_oplog_ts(self) -> Timestamp | None:
        return self._edge(-1)

    def oldest(self) -> Timestamp | None:
        return self._edge(1)

    def tail(self, since: Timestamp, stop: threading.Event) -> Iterator[RawBSONDocument | None]:
        """Entries with ts >= since, following the oplog; None each time it waits without news."""
        cursor = self._call("tailing local.oplog.rs", lambda: self._oplog(raw=True).find(
            {"ts": {"$gte": since}}, cursor_type=self._pymongo.CursorType.TAILABLE_AWAIT).max_await_time_ms(AWAIT_MS))
        try:
            while not stop.is_set():
                if not cursor.alive:
                    raise DriverError(f"{self.where}: the oplog cursor died (the oplog may have rolled over)")
                try:
                    entry = self._call("tailing local.oplog.rs", lambda: next(cursor))
                except StopIteration:  # the await ran out with no new entry; the tailable cursor stays open
                    entry = None
                yield entry
        finally:
            cursor.close()

    def count_documents(self, exclude_system: bool = True) -> dict[str, int]:
        counts: dict[str, int] = {}
        for db_name in self._call("listDatabases", self.client.list_database_names):
            if db_name in ("local", "config"):
                continue
            db = self.client[db_name]
            for coll in self._call("listCollections", lambda: db.list_collection_names(
                    filter={"type": "collection"})):
                if exclude_system and coll.startswith("system."):
                    continue
                counts[f"{db_name}.{coll}"] = self._call("count", lambda c=coll: db[c].count_documents({}))
        return counts
