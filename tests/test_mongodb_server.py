"""The MongoDB driver against a real one-node replica set, when mongod and the database tools are installed.

MongoDB cannot be installed on the machines this was written on (see
ENVIRONMENT.md), so there these tests skip, saying so; test_mongodb_fakes.py
covers argv, streams, errors and the PITR plan with fake executables.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from backupd.context import JobContext
from backupd.settings import load_settings
from core_fixtures import Keys
from support import run_backupd, write_config

TOOLS = ("mongod", "mongodump", "mongorestore")


def _require_mongo() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not on PATH: no real MongoDB here (fake-executable tests cover the driver)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mongod(directory: Path, replica_set: bool) -> tuple[subprocess.Popen, int]:
    import pymongo

    directory.mkdir(parents=True)
    port = _free_port()
    argv = ["mongod", "--dbpath", str(directory), "--port", str(port), "--bind_ip", "127.0.0.1",
            "--logpath", str(directory / "mongod.log"), "--unixSocketPrefix", str(directory)]
    if replica_set:
        argv += ["--replSet", "rs0"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true", serverSelectionTimeoutMS=30000)
    client.admin.command("ping")
    if replica_set:
        client.admin.command("replSetInitiate", {"_id": "rs0", "members": [{"_id": 0, "host": f"127.0.0.1:{port}"}]})
        deadline = time.monotonic() + 30
        while not client.admin.command("hello").get("isWritablePrimary"):
            assert time.monotonic() < deadline, "replica set did not elect a primary"
            time.sleep(0.2)
    client.close()
    return proc, port


@pytest.fixture
def mongo(tmp_path: Path) -> Iterator[tuple[int, int]]:
    _require_mongo()
    source, source_port = start_mongod(tmp_path / "source", replica_set=True)
    target, target_port = start_mongod(tmp_path / "target", replica_set=False)
    try:
        yield source_port, target_port
    finally:
        for proc in (source, target):
            proc.terminate()
            proc.wait(30)


def test_backup_verify_and_point_in_time_restore(mongo: tuple[int, int], keys: Keys, tmp_path: Path) -> None:
    import pymongo

    source_port, target_port = mongo
    source = pymongo.MongoClient(f"mongodb://127.0.0.1:{source_port}/?directConnection=true")
    source.shop.orders.insert_many([{"_id": i, "total": i} for i in range(500)])
    config = write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.docs": {"driver": "mongodb", "dsn": f"mongodb://127.0.0.1:{source_port}/?directConnection=true",
                      "storage": "main", "archive_logs": True, "oplog_interval": 1,
                      "verify": {"checks": ["shop.orders {\"_id\": 7}"]}},
    })
    backup_id = run_backupd("backup", "docs", config=config, check=True).out.strip()
    manifest = json.loads(run_backupd("show", backup_id, "--json", config=config).out)
    assert manifest["row_counts"] == {"shop.orders": 500}
    assert manifest["metadata"]["pitr"]["log_kind"] == "oplog"
    assert run_backupd("verify", "docs", config=config).code == 0

    ctx = JobContext(load_settings(config), "docs")
    stop = threading.Event()
    archiver = ctx.driver.log_archivers()[0]
    thread = threading.Thread(target=archiver.run, args=(stop,))
    thread.start()
    try:
        source.shop.orders.insert_many([{"_id": 1000 + i} for i in range(10)])
        time.sleep(1.5)
        target_time = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        time.sleep(1.5)
        source.shop.orders.delete_many({})  # the mistake PITR undoes
        time.sleep(2.5)
    finally:
        stop.set()
        thread.join(30)
    result = run_backupd("restore", "docs", "--to", f"mongodb://127.0.0.1:{target_port}",
                         "--target-time", target_time.isoformat().replace("+00:00", "Z"), config=config)
    assert result.code == 0, result.err
    target = pymongo.MongoClient(f"mongodb://127.0.0.1:{target_port}/?directConnection=true")
    assert target.shop.orders.count_documents({}) == 510
