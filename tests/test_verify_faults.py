"""Each fault makes `backupd verify` exit 3, name the fault, and set the result metric to 0."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

import kvlog_driver
from backupd import metrics
from backupd.daemon.gaps import watch
from backupd.cli.main import main
from backupd.errors import EXIT_VERIFY_BAD
from backupd.settings import load_settings
from backupd.context import JobContext
from core_fixtures import Keys, SqliteJob
from support import run_backupd, stored_report
from test_prune import backup_at, kvlog_config


def result_metric(job: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("backupd_verification_last_result", {"job": job})


def verify(config: Path, job: str, *extra: str) -> int:
    return main(["--config", str(config), "--log-level", "error", "verify", job, *extra])


@pytest.fixture
def backed_up(sqlite_job: SqliteJob) -> tuple[SqliteJob, str, Path]:
    backup_id = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    assert verify(sqlite_job.config, "shop") == 0
    assert result_metric("shop") == 1
    return sqlite_job, backup_id, sqlite_job.repo_root / "shop" / "backups" / backup_id


def test_corrupted_object(backed_up, capsys) -> None:
    job, backup_id, directory = backed_up
    obj = directory / "db.zst.age"
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x01
    obj.write_bytes(bytes(data))
    capsys.readouterr()
    assert verify(job.config, "shop") == EXIT_VERIFY_BAD
    out = capsys.readouterr().out
    assert f"{backup_id}  full  BAD" in out
    assert f"shop/backups/{backup_id}/db.zst.age: sha256 differs from the manifest's (object corrupt)" in out
    assert result_metric("shop") == 0


def test_manifest_counts_disagree_with_the_data(backed_up, capsys) -> None:
    job, backup_id, directory = backed_up
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["row_counts"]["orders"] += 1
    (directory / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert verify(job.config, "shop") == EXIT_VERIFY_BAD
    out = capsys.readouterr().out
    expected = job.counts["orders"]
    assert f"table orders: {expected} rows restored, the manifest says {expected + 1}" in out
    assert result_metric("shop") == 0
    reports = sorted((job.repo_root / "shop" / "verify").glob("*.json"))
    newest = stored_report(reports[-1], job.keys.identity_file)
    assert newest["result"] == "failed" and newest["counts_found"]["orders"] == expected


def test_missing_log_inside_the_window(tmp_path: Path, keys: Keys, monkeypatch, capsys) -> None:
    kvlog_driver.install(monkeypatch)
    config = kvlog_config(tmp_path, keys, {"keep_last": 2, "pitr_window": "2d"})
    ctx = JobContext(load_settings(config), "kv")
    store = kvlog_driver.KvStore(tmp_path / "kv")
    archive = ctx.log_archive("oplog")
    start = dt.datetime(2026, 11, 20, tzinfo=dt.timezone.utc)
    for hour in range(0, 48, 6):
        moment = start + dt.timedelta(hours=hour)
        store.now = moment
        if hour % 24 == 0:
            backup_at(ctx, moment, monkeypatch)
        store.now = moment + dt.timedelta(hours=1)
        store.set("k", str(hour))
        archive.push_file(*store.rotate())
    ctx.close()
    assert verify(config, "kv") == 0 and verify(config, "kv", "--integrity-only") == 0
    assert result_metric("kv") == 1

    lost = kvlog_driver.log_name(3)  # after the first backup, before the second
    (tmp_path / "repo" / "kv" / "oplog" / f"{lost}.zst.age").unlink()
    capsys.readouterr()
    assert verify(config, "kv") == EXIT_VERIFY_BAD
    out = capsys.readouterr().out
    assert f"log archive gap: missing oplog slice {lost}" in out
    assert result_metric("kv") == 0

    # The daemon counts the gap once, the first time it sees it, not at every look.
    gaps_before = metrics.REGISTRY.get_sample_value("backupd_archive_gaps_total", {"job": "kv"}) or 0
    ctx = JobContext(load_settings(config), "kv")
    try:
        assert watch(ctx) == [f"missing oplog slice {lost}"]
        assert watch(ctx) == []
    finally:
        ctx.close()
    assert metrics.REGISTRY.get_sample_value("backupd_archive_gaps_total", {"job": "kv"}) == gaps_before + 1

    # The integrity-only check (no private key needed) finds it too, for each backup it affects.
    assert verify(config, "kv", "--integrity-only") == EXIT_VERIFY_BAD
    out = capsys.readouterr().out
    assert out.count(f"missing oplog slice {lost}") == 1  # only the first backup's logs run through it
