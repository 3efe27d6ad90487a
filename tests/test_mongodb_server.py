"""The MongoDB driver with the real mongodump/mongorestore 100.18 against a wire-protocol server.

No mongod can be installed on the machines these tests run on (ENVIRONMENT.md,
"MongoDB"): the servers are tests/mongod_standin.py, SecantusDB with mongod's
arguments plus ``applyOps`` and a race-free oplog tail. So these tests prove how
backupd drives the real tools and pymongo, not mongod's own behaviour.
test_mongodb_fakes.py keeps the error paths real tools cannot be made to produce.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import bson
import pytest
from bson import Timestamp

from backupd import metrics
from backupd.context import JobContext
from backupd.settings import load_settings
from core_fixtures import Keys
from mongo_real_support import Standin, install_standin_binary, require_mongo_tools, start_standin, tools_env
from support import require_tool, run_backupd, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Standin]:
    require_mongo_tools()
    server = start_standin(tmp_path / "source")
    yield server
    server.stop()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Standin]:
    server = start_standin(tmp_path / "target", replica_set=None)
    yield server
    server.stop()


def job_config(tmp_path: Path, keys: Keys, source: Standin, **extra: Any) -> Path:
    return write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.docs": {"driver": "mongodb", "dsn": source.uri, "storage": "main", "archive_logs": True,
                      "oplog_interval": 1, **extra},
    })


def backupd(config: Path, *args: str, check: bool = True) -> Any:
    return run_backupd(*args, config=config, env=tools_env(), check=check, timeout=300)


class Writer:
    """Inserts into shop.events from a thread until stopped."""

    def __init__(self, server: Standin) -> None:
        self.client = server.client()
        self.stop = threading.Event()
        self.written = 0
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.client.shop.events.insert_one({"_id": self.written, "n": self.written})
            self.client.shop.events.update_one({"_id": self.written}, {"$set": {"seen": True}})
            self.written += 1

    def __enter__(self) -> "Writer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        self.client.close()


def oplog_ts(server: Standin, ns: str | None = None) -> list[Timestamp]:
    with server.client() as client:
        query = {"ns": ns} if ns else {}
        return [e["ts"] for e in client.local["oplog.rs"].find(query).sort("$natural", 1)]


def test_backup_under_writes_records_exact_counts_and_verifies(source: Standin, keys: Keys, tmp_path: Path) -> None:
    require_tool("bwrap")
    client = source.client()
    client.shop.orders.insert_many([{"_id": i, "total": i} for i in range(400)])
    client.crm.people.insert_many([{"_id": i} for i in range(25)])
    mongod = install_standin_binary()
    try:
        config = job_config(tmp_path, keys, source, mongod=str(mongod), mongod_readable=[sys.prefix],
                            verify={"checks": ['shop.orders {"_id": 7}']})
        with Writer(source):
            time.sleep(0.5)
            backup_id = backupd(config, "backup", "docs").out.strip()
        manifest = json.loads(backupd(config, "show", backup_id, "--json").out)
        counts = manifest["row_counts"]
        assert ".oplog" not in counts  # defect 1: the oplog's prelude entry is not a collection
        assert counts["shop.orders"] == 400 and counts["crm.people"] == 25
        assert set(counts) == {"shop.orders", "crm.people", "shop.events"}
        assert 0 < counts["shop.events"]
        assert manifest["metadata"]["oplog"] is True and manifest["tool_versions"]["mongodump"] == "100.18.0-21-g8fa3cfc82"

        result = backupd(config, "verify", "docs", check=False)  # the scratch stand-in restores the same counts
        assert result.code == 0, result.err
    finally:
        shutil.rmtree(mongod.parent, ignore_errors=True)
        client.close()


def test_oplog_archiver_and_point_in_time_restore(source: Standin, target: Standin, keys: Keys,
                                                  tmp_path: Path) -> None:
    client = source.client()
    client.shop.orders.insert_many([{"_id": i} for i in range(100)])
    config = job_config(tmp_path, keys, source)
    backup_id = backupd(config, "backup", "docs").out.strip()
    manifest = json.loads(backupd(config, "show", backup_id, "--json").out)
    consistent = bson.Timestamp(*(int(p) for p in manifest["metadata"]["oplog_from"].split(".")))

    ctx = JobContext(load_settings(config), "docs")
    stop = threading.Event()
    archiver = ctx.driver.log_archivers()[0]
    failure: list[BaseException] = []

    def run() -> None:
        try:
            archiver.run(stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        with Writer(source):  # the archiver tails while writes run
            client.shop.orders.insert_one({"_id": "before"})
            time.sleep(1.1)
            target_second = int(time.time())
            while int(time.time()) <= target_second:
                time.sleep(0.05)
            time.sleep(0.2)
            client.shop.orders.insert_one({"_id": "after"})
            client.shop.orders.delete_many({"_id": {"$lt": 50}})  # the mistake PITR undoes
            time.sleep(1.5)
        time.sleep(2.5)
    finally:
        stop.set()
        thread.join(60)
    assert not failure, failure

    # every entry after the dump's consistent point is archived, in order, none lost to the tail's race
    archived: list[Timestamp] = []
    for name in sorted(ctx.log_archive("oplog").iter_names()):
        with ctx.open_log("oplog", name) as stream:
            archived += [e["ts"] for e in bson.decode_all(stream.read())]
    after = (consistent.time, consistent.inc)
    wanted = [ts for ts in oplog_ts(source) if (ts.time, ts.inc) > after]
    assert len(wanted) > 500
    assert [ts for ts in archived if (ts.time, ts.inc) > after] == wanted

    target_time = dt.datetime.fromtimestamp(target_second, dt.timezone.utc)
    result = backupd(config, "restore", "docs", "--to", target.uri,
                     "--target-time", target_time.isoformat().replace("+00:00", "Z"))
    assert "replayed" in result.out
    restored = target.client()
    assert restored.shop.orders.find_one({"_id": "before"}) is not None
    assert restored.shop.orders.find_one({"_id": "after"}) is None
    assert restored.shop.orders.count_documents({}) == 101  # the delete after the target is not replayed
    events_before = {e["o"]["_id"] for e in source.client().local["oplog.rs"].find(
        {"ns": "shop.events", "op": "i", "ts": {"$lt": Timestamp(target_second + 1, 0)}})}
    assert {d["_id"] for d in restored.shop.events.find({}, {"_id": 1})} == events_before
    assert restored.shop.events.count_documents({"seen": {"$exists": False}}) <= 1  # updates replayed too
    restored.close()
    client.close()


def test_partial_restore_of_one_collection(source: Standin, target: Standin, keys: Keys, tmp_path: Path) -> None:
    client = source.client()
    client.shop.orders.insert_many([{"_id": i} for i in range(60)])
    client.shop.customers.insert_many([{"_id": i} for i in range(9)])
    config = job_config(tmp_path, keys, source, archive_logs=False)
    with Writer(source):
        time.sleep(0.3)
        backup_id = backupd(config, "backup", "docs").out.strip()
    manifest = json.loads(backupd(config, "show", backup_id, "--json").out)
    result = backupd(config, "restore", "docs", "--backup", backup_id, "--to", target.uri, "--collection", "shop.orders", check=False)
    assert result.code == 0, result.err  # defect 4: no --oplogReplay together with --nsInclude
    assert "only shop.orders" in result.out and "the dump's own oplog (filtered" in result.out
    restored = target.client()
    assert set(restored.list_database_names()) - {"admin", "config", "local"} == {"shop"}
    assert restored.shop.list_collection_names() == ["orders"]
    assert restored.shop.orders.count_documents({}) == manifest["row_counts"]["shop.orders"] == 60
    restored.close()
    client.close()


def test_databases_filter_dumps_everything_and_restores_only_those(source: Standin, target: Standin, keys: Keys,
                                                                   tmp_path: Path) -> None:
    client = source.client()
    client.shop.orders.insert_many([{"_id": i} for i in range(30)])
    client.crm.people.insert_many([{"_id": i} for i in range(7)])
    config = job_config(tmp_path, keys, source, databases=["crm"])
    backup_id = backupd(config, "backup", "docs").out.strip()  # defect 3: --oplog with a databases filter
    manifest = json.loads(backupd(config, "show", backup_id, "--json").out)
    assert manifest["metadata"]["oplog"] is True and manifest["metadata"]["databases"] == ["crm"]
    result = backupd(config, "restore", "docs", "--backup", backup_id, "--to", target.uri)
    assert "only crm.*" in result.out
    restored = target.client()
    assert "shop" not in restored.list_database_names()
    assert restored.crm.people.count_documents({}) == 7
    restored.close()
    client.close()


def test_archiver_reports_a_rolled_over_oplog_as_a_gap(tmp_path: Path, keys: Keys) -> None:
    from drivers.mongodb.oplog import OplogArchiver, find_gaps, key, list_slices
    from drivers.mongodb.server import MongoServer

    require_mongo_tools()
    server = start_standin(tmp_path / "small", oplog_max_entries=40)
    try:
        config = job_config(tmp_path, keys, server)
        ctx = JobContext(load_settings(config), "docs")
        archive = ctx.log_archive("oplog")
        spool = tmp_path / "spool"
        spool.mkdir()
        client = server.client()
        client.shop.orders.insert_many([{"_id": i} for i in range(10)])

        def archive_once() -> OplogArchiver:
            stop = threading.Event()
            with MongoServer(server.uri, None) as mongo:
                archiver = OplogArchiver("docs", archive, mongo, spool, interval=0.2)
                timer = threading.Timer(1.5, stop.set)
                timer.start()
                archiver.run(stop)
                timer.cancel()
            return archiver

        first = archive_once()
        assert first.gaps == 0 and list(archive.iter_names())
        for i in range(100):  # far past the 40-entry cap: the entry the chain continues from is gone
            client.shop.orders.insert_one({"_id": 100 + i})
        client.admin.command("secantusAdmin.pruneOplog")  # SecantusDB prunes every 1000 writes; now, here
        oldest = client.local["oplog.rs"].find_one(sort=[("$natural", 1)])["ts"]
        assert key(oldest) > max(key(s.last) for s in list_slices(archive))  # the resume entry is gone
        before = metrics.ARCHIVE_GAPS.labels("docs")._value.get()
        second = archive_once()
        assert second.gaps == 1
        assert metrics.ARCHIVE_GAPS.labels("docs")._value.get() == before + 1
        assert find_gaps(list_slices(archive))  # the slice chain shows the break too
        client.close()
    finally:
        server.stop()
