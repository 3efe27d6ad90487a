"""A job with two repositories, a filesystem one and an S3 one (moto), through the real CLI.

Every backup and archived WAL goes to both; the S3 endpoint stopped during a backup or during WAL
archiving stops neither; the daemon's catch-up copies what S3 missed once it is back; reads fall
back object by object; each repository is pruned by its own policy; ``backupd copy`` seeds one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import boto3
import pytest

import s3_server
from backupd import metrics
from backupd.daemon.copywatch import CopyWatch
from backupd.settings import load_settings
from core_fixtures import Keys
from daemon_support import start_daemon  # noqa: F401 (fixture)
from support import BACKUPD, error_lines, run_backupd, write_config


class Endpoint:
    """A moto S3 server on a fixed port that can be stopped and started again (its buckets survive)."""

    def __init__(self) -> None:
        self.port = s3_server.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@dataclass
class Geo:
    root: Path
    config: Path
    local: Path
    bucket: str
    endpoint: Endpoint
    db: Path

    def s3_keys(self, prefix: str = "") -> dict[str, bytes]:
        client = boto3.client("s3", endpoint_url=self.endpoint.url, region_name="us-east-1")
        found = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix="geo/" + prefix):
            for item in page.get("Contents", []):
                found[item["Key"][len("geo/"):]] = client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
        return found

    def local_keys(self, prefix: str = "") -> dict[str, bytes]:
        return {str(p.relative_to(self.local)): p.read_bytes() for p in sorted((self.local / prefix).rglob("*"))
                if p.is_file() and not p.name.startswith(".")} if (self.local / prefix).exists() else {}

    def backupd(self, *args: str, storage: str | None = None, check: bool = False) -> object:
        env = {"BACKUPD_JOBS__SHOP__STORAGE": storage} if storage else None
        return run_backupd(*args, config=self.config, env=env, check=check)

    def catch_up(self) -> CopyWatch:
        watch = CopyWatch(lambda: load_settings(self.config), 60)
        watch.turn(load_settings(self.config), "shop")
        return watch


def gauge(metric: object, *labels: str) -> float:
    return metric.labels(*labels)._value.get()  # type: ignore[attr-defined]


def make_db(path: Path, rows: int, blob: int = 0) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, note TEXT, data BLOB)")
    db.executemany("INSERT INTO orders (note, data) VALUES (?, ?)",
                   [(f"order {i}", os.urandom(blob)) for i in range(rows)])
    db.commit()
    db.close()


def rows(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT count(*) FROM orders").fetchone()[0]
    finally:
        db.close()


@pytest.fixture
def geo(tmp_path: Path, keys: Keys) -> Iterator[Geo]:
    with s3_server.dummy_aws_env():
        endpoint = Endpoint()
        endpoint.start()
        try:
            bucket = s3_server.create_bucket(endpoint.url)
            db = tmp_path / "shop.sqlite3"
            make_db(db, 2000)
            config = write_config(tmp_path / "backupd.toml", {
                "daemon": {"state_dir": str(tmp_path / "state")},
                "storage.local": {"type": "filesystem", "path": str(tmp_path / "local")},
                "storage.offsite": {"type": "s3", "bucket": bucket, "prefix": "geo/", "endpoint_url": endpoint.url,
                                    "region": "us-east-1", "max_attempts": 1, "connect_timeout": 1,
                                    "read_timeout": 10, "part_size": "5MiB"},
                "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
                "jobs.shop": {"driver": "sqlite", "path": str(db), "storage": ["local", "offsite"]},
            })
            yield Geo(tmp_path, config, tmp_path / "local", bucket, endpoint, db)
        finally:
            endpoint.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_every_backup_lands_in_both_repositories_byte_for_byte(geo: Geo, tmp_path: Path) -> None:
    backup_id = geo.backupd("backup", "shop", check=True).out.strip()
    local, s3 = geo.local_keys("shop/backups"), geo.s3_keys("shop/backups")
    assert sorted(local) == sorted(s3) == [f"shop/backups/{backup_id}/db.zst.age",
                                           f"shop/backups/{backup_id}/manifest.json"]
    assert {k: sha(v) for k, v in local.items()} == {k: sha(v) for k, v in s3.items()}  # encrypted once
    for storage in ("local", "offsite"):
        target = tmp_path / f"from-{storage}.sqlite3"
        geo.backupd("restore", "shop", "--to", str(target), storage=storage, check=True)
        assert rows(target) == 2000


def test_s3_stopped_during_a_backup_then_caught_up(geo: Geo) -> None:
    first = geo.backupd("backup", "shop", check=True).out.strip()
    watch = geo.catch_up()
    assert gauge(metrics.COPY_BEHIND_OBJECTS, "shop", "offsite") == 0
    assert gauge(metrics.STORAGE_UP, "offsite") == 1

    make_db(geo.db, 300, blob=64 << 10)  # ~20 MB of incompressible rows: a multipart upload under way
    backups = geo.local / "shop" / "backups"
    proc = subprocess.Popen([*BACKUPD, "--config", str(geo.config), "--log-format", "json", "backup", "shop"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop_when_started() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len([p for p in backups.iterdir() if p.is_dir()]) < 2:
            time.sleep(0.005)
        geo.endpoint.stop()

    stopper = threading.Thread(target=stop_when_started)
    stopper.start()
    out, err = proc.communicate(timeout=120)
    stopper.join()
    assert proc.returncode == 0, err
    second = out.strip()
    assert second != first
    assert "storage failed; the other repositories carry on" in err
    assert (backups / second / "manifest.json").is_file()

    watch.turn(load_settings(geo.config), "shop")  # S3 down: measured against its last listing
    assert gauge(metrics.STORAGE_UP, "offsite") == 0
    assert gauge(metrics.STORAGE_UP, "local") == 1
    assert gauge(metrics.COPY_BEHIND_OBJECTS, "shop", "offsite") == 2  # the stream and the manifest
    assert gauge(metrics.COPY_BEHIND_OBJECTS, "shop", "local") == 0
    assert gauge(metrics.COPY_BEHIND_SECONDS, "shop", "offsite") >= 0
    listing = geo.backupd("list", "--json", check=True)
    assert [b["backup_id"] for b in json.loads(listing.out)["backups"]] == [second, first]
    status = json.loads(geo.backupd("status", "shop", "--json").out)["jobs"][0]
    assert [(c["storage"], c["reachable"]) for c in status["lagging_copies"]] == [("local", True), ("offsite", False)]
    assert any(p.startswith("repository offsite is not reachable") for p in status["problems"])

    geo.endpoint.start()
    assert f"shop/backups/{second}/manifest.json" not in geo.s3_keys()  # never committed in a partial copy
    watch.turn(load_settings(geo.config), "shop")
    assert gauge(metrics.COPY_BEHIND_OBJECTS, "shop", "offsite") == 0
    assert gauge(metrics.COPY_BEHIND_SECONDS, "shop", "offsite") == 0
    assert gauge(metrics.STORAGE_UP, "offsite") == 1
    local, s3 = geo.local_keys("shop/backups"), geo.s3_keys("shop/backups")
    assert {k: sha(v) for k, v in local.items()} == {k: sha(v) for k, v in s3.items()}
    status = json.loads(geo.backupd("status", "shop", "--json").out)["jobs"][0]
    assert [c["behind_objects"] for c in status["lagging_copies"]] == [0, 0]
    for storage in ("local", "offsite"):
        result = geo.backupd("verify", "shop", "--integrity-only", storage=storage)
        assert result.code == 0, result.err
        assert result.out.count("integrity  ok") == 2


def test_an_object_deleted_from_one_repository_restores_from_the_other(geo: Geo, tmp_path: Path) -> None:
    backup_id = geo.backupd("backup", "shop", check=True).out.strip()
    (geo.local / "shop" / "backups" / backup_id / "db.zst.age").unlink()
    target = tmp_path / "restored.sqlite3"
    result = geo.backupd("restore", "shop", "--to", str(target))
    assert result.code == 0, result.err
    assert rows(target) == 2000
    fallback = [json.loads(line) for line in result.err.splitlines() if "read from another repository" in line]
    assert fallback and fallback[0]["storage"] == "offsite" and "local: missing" in fallback[0]["problems"]

    # and a corrupt copy in S3 (same size, other bytes) is read from local once local has it again
    geo.backupd("copy", "shop", "--to", "local", check=True)
    client = boto3.client("s3", endpoint_url=geo.endpoint.url, region_name="us-east-1")
    key = f"geo/shop/backups/{backup_id}/db.zst.age"
    body = bytearray(client.get_object(Bucket=geo.bucket, Key=key)["Body"].read())
    body[100] ^= 0xFF
    client.put_object(Bucket=geo.bucket, Key=key, Body=bytes(body))
    result = geo.backupd("verify", "shop", "--integrity-only")
    assert result.code == 0, result.err
    assert geo.backupd("verify", "shop", "--integrity-only", storage="offsite").code == 3

    # a manifest that no longer parses in local is read from offsite
    (geo.local / "shop" / "backups" / backup_id / "manifest.json").write_text("{ not json")
    listing = json.loads(geo.backupd("list", "--json", check=True).out)["backups"]
    assert [b["backup_id"] for b in listing] == [backup_id]
    result = geo.backupd("restore", "shop", "--to", str(tmp_path / "again.sqlite3"))
    assert result.code == 0, result.err
    assert rows(tmp_path / "again.sqlite3") == 2000
    assert "manifest read from another repository" in result.err


def test_each_repository_is_pruned_by_its_own_policy(geo: Geo) -> None:
    config = geo.config.read_text().replace(
        'storage = ["local", "offsite"]',
        'storage = ["local", "offsite"]\nretention = { keep_last = 3 }\nretention_by_storage = { local = { keep_last = 1 } }')
    geo.config.write_text(config)
    ids = [geo.backupd("backup", "shop", check=True).out.strip() for _ in range(4)]
    result = geo.backupd("prune", "shop", "--json", check=True)
    report = json.loads(result.out)["storages"]
    assert sorted(report["local"]["deleted"]["backups"]) == ids[:3]
    assert sorted(report["offsite"]["deleted"]["backups"]) == ids[:1]
    on_disk = {key.split("/")[2] for key in geo.local_keys("shop/backups")}
    in_s3 = {key.split("/")[2] for key in geo.s3_keys("shop/backups")}
    assert on_disk == {ids[3]}
    assert in_s3 == set(ids[1:])
    # the daemon's catch-up does not bring back what local's policy deleted
    geo.catch_up()
    assert {key.split("/")[2] for key in geo.local_keys("shop/backups")} == {ids[3]}
    assert gauge(metrics.COPY_BEHIND_OBJECTS, "shop", "local") == 0


def test_copy_seeds_an_empty_repository_and_a_second_run_copies_nothing(geo: Geo, tmp_path: Path) -> None:
    config = geo.config.read_text()
    geo.config.write_text(config.replace('storage = ["local", "offsite"]', 'storage = "local"'))
    ids = [geo.backupd("backup", "shop", check=True).out.strip() for _ in range(2)]
    assert geo.s3_keys() == {}
    geo.config.write_text(config)  # offsite added to the job, empty

    dry = geo.backupd("copy", "shop", "--to", "offsite", "--dry-run", check=True)
    assert "would copy 4 object(s)" in dry.out and geo.s3_keys() == {}
    first = geo.backupd("copy", "shop", "--to", "offsite", "--json", check=True)
    copied = json.loads(first.out)["copied"]
    assert copied == [f"shop/backups/{ids[0]}/db.zst.age", f"shop/backups/{ids[0]}/manifest.json",
                      f"shop/backups/{ids[1]}/db.zst.age", f"shop/backups/{ids[1]}/manifest.json"]
    again = geo.backupd("copy", "shop", "--to", "offsite", "--from", "local", check=True)
    assert again.out.strip() == "nothing to copy: offsite holds everything local holds"
    assert {k: sha(v) for k, v in geo.local_keys("shop/backups").items()} == \
        {k: sha(v) for k, v in geo.s3_keys("shop/backups").items()}
    assert geo.backupd("verify", "shop", "--integrity-only", storage="offsite").code == 0
    target = tmp_path / "from-offsite.sqlite3"
    geo.backupd("restore", "shop", "--to", str(target), storage="offsite", check=True)
    assert rows(target) == 2000

    bad = geo.backupd("copy", "shop", "--to", "elsewhere")
    assert bad.code == 2 and "has no storage 'elsewhere'" in "\n".join(error_lines(bad.err))


def test_min_copies_two_fails_the_backup_while_s3_is_down(geo: Geo) -> None:
    geo.config.write_text(geo.config.read_text().replace('storage = ["local", "offsite"]',
                                                         'storage = ["local", "offsite"]\nmin_copies = 2'))
    geo.endpoint.stop()
    result = geo.backupd("backup", "shop")
    assert result.code == 1
    assert "min_copies" in "\n".join(error_lines(result.err))
    assert not list((geo.local / "shop" / "backups").glob("*/manifest.json"))  # committed nowhere
    geo.endpoint.start()
    geo.backupd("backup", "shop", check=True)


def test_min_copies_above_the_storage_count_is_a_config_error(geo: Geo) -> None:
    geo.config.write_text(geo.config.read_text().replace('storage = ["local", "offsite"]',
                                                         'storage = ["local", "offsite"]\nmin_copies = 3'))
    result = geo.backupd("list")
    assert result.code == 2
    assert "jobs.shop.min_copies: the job has 2 storage(s) (got 3)" in result.err


# ---- WAL archiving -------------------------------------------------------------------------------

SEGMENT = 16 << 20


@contextlib.contextmanager
def wal_job(geo: Geo, min_copies: int = 1) -> Iterator[Path]:
    """The same repositories for a postgres job that archives WAL from a data directory (no server:
    ``wal-push`` and ``wal-fetch`` take real WAL-sized files)."""
    data = geo.root / "pgdata"
    (data / "pg_wal").mkdir(parents=True)
    text = geo.config.read_text().replace("[jobs.shop]", "[jobs.old]")
    text += (f'\n[jobs.pg]\ndriver = "postgres"\ndsn = "postgresql://backup@127.0.0.1:1/shop"\n'
             f'storage = ["local", "offsite"]\nmin_copies = {min_copies}\narchive_logs = true\n'
             f'method = "physical"\ndata_dir = "{data}"\n')
    geo.config.write_text(text)
    yield data / "pg_wal"


def segment(wal: Path, number: int) -> Path:
    path = wal / f"0000000100000000000000{number:02X}"
    path.write_bytes(os.urandom(SEGMENT // 4) * 4)  # WAL-sized, partly compressible
    return path


def test_wal_archiving_goes_on_locally_while_s3_is_down_and_is_caught_up(geo: Geo) -> None:
    with wal_job(geo) as wal:
        pushed = [segment(wal, n) for n in range(1, 5)]
        run_backupd("wal-push", str(pushed[0]), "--job", "pg", config=geo.config, check=True)
        geo.endpoint.stop()
        for path in pushed[1:3]:
            result = run_backupd("wal-push", str(path), "--job", "pg", config=geo.config)
            assert result.code == 0, result.err  # min_copies = 1: local holds it durably
        geo.endpoint.start()
        run_backupd("wal-push", str(pushed[3]), "--job", "pg", config=geo.config, check=True)
        s3 = geo.s3_keys("pg/wal")
        assert len([k for k in s3 if k.endswith(".zst.age")]) == 2  # the first and the last

        watch = CopyWatch(lambda: load_settings(geo.config), 60)
        watch.turn(load_settings(geo.config), "pg")
        assert gauge(metrics.COPY_BEHIND_OBJECTS, "pg", "offsite") == 0
        local, s3 = geo.local_keys("pg/wal"), geo.s3_keys("pg/wal")
        assert len(local) == 4
        assert {k: sha(v) for k, v in local.items()} == {k: sha(v) for k, v in s3.items()}
        for path in pushed:  # offsite alone serves every segment, byte for byte
            dest = geo.root / f"fetched-{path.name}"
            env = {"BACKUPD_JOBS__PG__STORAGE": "offsite", "BACKUPD_JOBS__PG__MIN_COPIES": "1"}
            run_backupd("wal-fetch", path.name, str(dest), "--job", "pg", config=geo.config, env=env, check=True)
            assert sha(dest.read_bytes()) == sha(path.read_bytes())


def test_wal_is_acknowledged_only_once_min_copies_hold_it(geo: Geo) -> None:
    with wal_job(geo, min_copies=2) as wal:
        path = segment(wal, 1)
        geo.endpoint.stop()
        result = run_backupd("wal-push", str(path), "--job", "pg", config=geo.config)
        assert result.code == 1
        assert "min_copies" in "\n".join(error_lines(result.err))
        assert not [k for k in geo.local_keys("pg/wal") if k.endswith(".zst.age")]  # not left half-archived
        geo.endpoint.start()
        run_backupd("wal-push", str(path), "--job", "pg", config=geo.config, check=True)
        assert len([k for k in geo.s3_keys("pg/wal") if k.endswith(".zst.age")]) == 1
        assert len([k for k in geo.local_keys("pg/wal") if k.endswith(".zst.age")]) == 1


def test_a_corrupt_wal_object_is_fetched_from_the_other_repository(geo: Geo) -> None:
    with wal_job(geo) as wal:
        path = segment(wal, 1)
        run_backupd("wal-push", str(path), "--job", "pg", config=geo.config, check=True)
        stored = next(p for p in (geo.local / "pg" / "wal").rglob("*.zst.age"))
        body = bytearray(stored.read_bytes())
        body[len(body) // 2] ^= 0xFF
        stored.write_bytes(bytes(body))
        dest = geo.root / "fetched"
        result = run_backupd("wal-fetch", path.name, str(dest), "--job", "pg", config=geo.config)
        assert result.code == 0, result.err
        assert sha(dest.read_bytes()) == sha(path.read_bytes())
        assert "log read from another repository" in result.err


# ---- the daemon ------------------------------------------------------------------------------------

def test_the_daemon_exports_copy_metrics_from_start_and_catches_a_repository_up(tmp_path: Path, keys: Keys,
                                                                                 start_daemon) -> None:
    from core_fixtures import make_sample_db
    from daemon_support import free_port

    db = tmp_path / "shop.sqlite3"
    make_sample_db(db)
    port = free_port()

    def config(storage: object) -> Path:
        return write_config(tmp_path / "backupd.toml", {
            "daemon": {"state_dir": str(tmp_path / "state"), "metrics_listen": f"127.0.0.1:{port}",
                       "shutdown_timeout": "10s", "repository_poll_interval": "1s"},
            "storage.local": {"type": "filesystem", "path": str(tmp_path / "local")},
            "storage.offsite": {"type": "filesystem", "path": str(tmp_path / "offsite")},
            "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
            "jobs.shop": {"driver": "sqlite", "path": str(db), "storage": storage},
        })

    backup_id = run_backupd("backup", "shop", config=config("local"), check=True).out.strip()
    d = start_daemon(config(["local", "offsite"]), port)
    d.wait_ready()
    for storage in ("local", "offsite"):  # the series exist from the first scrape
        assert d.metric("backupd_copy_behind_objects", job="shop", storage=storage) is not None
        assert d.metric("backupd_copy_behind_seconds", job="shop", storage=storage) is not None
        assert d.metric("backupd_storage_up", storage=storage) is not None
    d.wait_for(lambda: (tmp_path / "offsite" / "shop" / "backups" / backup_id / "manifest.json").exists(),
               what="the catch-up copying the backup offsite")
    d.wait_for(lambda: d.metric("backupd_copy_behind_objects", job="shop", storage="offsite") == 0
               and d.metric("backupd_storage_up", storage="offsite") == 1, what="offsite caught up")
    assert (tmp_path / "offsite" / "shop" / "backups" / backup_id / "db.zst.age").read_bytes() == \
        (tmp_path / "local" / "shop" / "backups" / backup_id / "db.zst.age").read_bytes()
    assert d.stop() == 0
