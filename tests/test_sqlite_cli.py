"""The SQLite job end to end through the real CLI: backup, list, show, verify, restore."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from core_fixtures import SqliteJob
from support import error_lines, run_backupd


def counts(path: Path) -> dict[str, int]:
    db = sqlite3.connect(path)
    try:
        return {t: db.execute(f"select count(*) from {t}").fetchone()[0] for t in ("customers", "orders")}
    finally:
        db.close()


def test_backup_list_show_restore(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    result = run_backupd("backup", "shop", config=sqlite_job.config, check=True)
    backup_id = result.out.strip()
    assert len(backup_id) >= 16 and backup_id.endswith("Z")

    listing = run_backupd("list", "--json", config=sqlite_job.config, check=True)
    backups = json.loads(listing.out)["backups"]
    assert [b["backup_id"] for b in backups] == [backup_id]
    assert backups[0]["job"] == "shop" and backups[0]["method"] == "logical"
    assert backups[0]["raw_size"] == sqlite_job.db.stat().st_size

    table = run_backupd("list", config=sqlite_job.config, check=True).out
    assert table.splitlines()[0].split()[:3] == ["ID", "JOB", "METHOD"]
    assert backup_id in table

    shown = json.loads(run_backupd("show", backup_id, "--json", config=sqlite_job.config, check=True).out)
    assert shown["format_version"] == 1
    assert shown["row_counts"] == sqlite_job.counts
    assert shown["objects"][0]["key"] == "db.zst.age"
    assert len(shown["objects"][0]["sha256"]) == 64
    assert "sqlite" in shown["tool_versions"]

    target = tmp_path / "restored.sqlite3"
    run_backupd("restore", "shop", "--to", str(target), config=sqlite_job.config, check=True)
    assert counts(target) == sqlite_job.counts


def test_backups_are_listed_newest_first(sqlite_job: SqliteJob) -> None:
    first = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    second = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    assert first != second
    ids = [b["backup_id"] for b in json.loads(run_backupd("list", "--json", config=sqlite_job.config).out)["backups"]]
    assert ids == [second, first]


def test_restore_refuses_to_overwrite_without_force(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    run_backupd("backup", "shop", config=sqlite_job.config, check=True)
    target = tmp_path / "existing.sqlite3"
    target.write_bytes(b"precious")
    result = run_backupd("restore", "shop", "--to", str(target), config=sqlite_job.config)
    assert result.code == 1
    assert "file exists; refusing to overwrite it" in result.err
    assert target.read_bytes() == b"precious"
    run_backupd("restore", "shop", "--to", str(target), "--force", config=sqlite_job.config, check=True)
    assert counts(target) == sqlite_job.counts


def test_dry_run_touches_nothing(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    backup_id = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    target = tmp_path / "never.sqlite3"
    result = run_backupd("restore", "shop", "--to", str(target), "--dry-run", config=sqlite_job.config, check=True)
    assert backup_id in result.out and "dry run" in result.out
    assert not target.exists()


def test_target_time_without_offset_is_refused(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    run_backupd("backup", "shop", config=sqlite_job.config, check=True)
    result = run_backupd("restore", "shop", "--to", str(tmp_path / "x.db"), "--target-time", "2026-11-24T18:00:00",
                         config=sqlite_job.config)
    assert result.code == 2
    assert "no UTC offset" in result.err


def test_target_time_picks_the_newest_backup_before_it(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    first = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    shown = json.loads(run_backupd("show", first, "--json", config=sqlite_job.config).out)
    time.sleep(1.1)
    db = sqlite3.connect(sqlite_job.db)
    db.execute("insert into orders (customer, note) values (1, 'after first')")
    db.commit()
    db.close()
    run_backupd("backup", "shop", config=sqlite_job.config, check=True)
    result = run_backupd("restore", "shop", "--to", str(tmp_path / "t.db"), "--target-time", shown["finished_at"],
                         "--dry-run", config=sqlite_job.config, check=True)
    assert first in result.out
    early = run_backupd("restore", "shop", "--to", str(tmp_path / "t.db"), "--target-time", "2001-01-01T00:00:00Z",
                        config=sqlite_job.config)
    assert early.code == 2 and "before the oldest backup" in early.err


def test_full_verify_restores_and_counts(sqlite_job: SqliteJob) -> None:
    backup_id = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    result = run_backupd("verify", "shop", "--json", config=sqlite_job.config)
    assert result.code == 0, result.err
    report = json.loads(result.out)["reports"][0]
    assert report["backup_id"] == backup_id and report["result"] == "passed"
    assert report["counts_found"] == sqlite_job.counts == report["counts_expected"]
    assert {c["check"] for c in report["checks"]} >= {"PRAGMA integrity_check", "SELECT count(*) > 0 FROM orders"}
    stored = list((sqlite_job.repo_root / "shop" / "verify").glob("*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["result"] == "passed"


def test_verify_fails_with_3_when_counts_disagree(sqlite_job: SqliteJob) -> None:
    backup_id = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    manifest_path = sqlite_job.repo_root / "shop" / "backups" / backup_id / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["row_counts"]["orders"] += 1
    manifest_path.write_text(json.dumps(manifest))
    result = run_backupd("verify", "shop", config=sqlite_job.config)
    assert result.code == 3
    assert f"table orders: {sqlite_job.counts['orders']} rows restored, the manifest says {sqlite_job.counts['orders'] + 1}" in result.out


def test_failing_user_check_fails_verification(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    from core_fixtures import sqlite_job_config

    config = sqlite_job_config(tmp_path, sqlite_job.keys, {"type": "filesystem", "path": str(sqlite_job.repo_root)},
                               sqlite_job.db, {"verify": {"checks": ["SELECT count(*) > 1000000 FROM orders"]}})
    run_backupd("backup", "shop", config=config, check=True)
    result = run_backupd("verify", "shop", config=config)
    assert result.code == 3
    assert "check failed: SELECT count(*) > 1000000 FROM orders" in result.out


def test_consistent_snapshot_while_writers_keep_writing(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    db = sqlite3.connect(sqlite_job.db, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    stop = threading.Event()

    def writer() -> None:
        conn = sqlite3.connect(sqlite_job.db)
        while not stop.is_set():
            # Two tables changed in one transaction: a torn copy would show them out of step.
            with conn:
                conn.execute("insert into orders (customer, note) values (1, 'live')")
                conn.execute("insert into customers (name) values ('live')")
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        backup_id = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    finally:
        stop.set()
        thread.join()
        db.close()
    manifest = json.loads(run_backupd("show", backup_id, "--json", config=sqlite_job.config).out)
    recorded = manifest["row_counts"]
    assert recorded["orders"] - sqlite_job.counts["orders"] == recorded["customers"] - sqlite_job.counts["customers"] > 0
    target = tmp_path / "snap.sqlite3"
    run_backupd("restore", "shop", "--to", str(target), config=sqlite_job.config, check=True)
    assert counts(target) == recorded
    assert run_backupd("verify", "shop", config=sqlite_job.config).code == 0


def test_missing_database_fails_backup_cleanly(sqlite_job: SqliteJob) -> None:
    sqlite_job.db.unlink()
    result = run_backupd("backup", "shop", config=sqlite_job.config)
    assert result.code == 1
    assert [line for line in error_lines(result.err) if "database file not found" in line]
    assert json.loads(run_backupd("list", "--json", config=sqlite_job.config).out)["backups"] == []


def test_no_backups_yet(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    result = run_backupd("restore", "shop", "--to", str(tmp_path / "x.db"), config=sqlite_job.config)
    assert result.code == 1 and "no backups for job shop" in result.err


def test_check_reports_each_item(sqlite_job: SqliteJob) -> None:
    result = run_backupd("check", config=sqlite_job.config)
    assert result.code == 0, result.out + result.err
    lines = result.out.splitlines()
    assert any(line.startswith("ok") and "storage.main" in line and "write, read, stat, delete ok" in line for line in lines)
    assert any("encryption.identity_file" in line and "matches a configured recipient" in line for line in lines)
    assert any("jobs.shop: database" in line for line in lines)
    sqlite_job.db.unlink()
    failing = run_backupd("check", "shop", config=sqlite_job.config)
    assert failing.code == 1
    assert any(line.startswith("FAIL") and "database file not found" in line for line in failing.out.splitlines())


def test_keys_generate_prints_identity_and_recipient() -> None:
    result = run_backupd("keys", "generate", check=True)
    secret = [line for line in result.out.splitlines() if line.startswith("AGE-SECRET-KEY-1")]
    assert len(secret) == 1
    recipient = result.err.strip().splitlines()[-1]
    assert recipient.startswith("Public key: age1")
    from backupd import age

    assert str(age.X25519Identity.parse(secret[0]).to_recipient()) == recipient.removeprefix("Public key: ")


def test_a_one_shot_backup_records_no_metrics_and_skips_prometheus(sqlite_job: SqliteJob) -> None:
    """Only the daemon serves /metrics; a CLI run would pay the import before its dump starts."""
    import subprocess
    import sys

    probe = ("import sys; from backupd.cli.main import main; code = main(sys.argv[1:]); "
             "print(code, 'prometheus_client' in sys.modules, 'backupd.metrics' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, "--config", str(sqlite_job.config), "backup", "shop"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "0 False False"
    listing = json.loads(run_backupd("list", "--json", config=sqlite_job.config, check=True).out)["backups"]
    assert len(listing) == 1


def test_in_a_process_serving_metrics_a_backup_is_counted(sqlite_job: SqliteJob) -> None:
    from backupd import metrics
    from backupd.backup import run_backup
    from backupd.context import JobContext
    from backupd.settings import load_settings

    def runs() -> float:
        return metrics.REGISTRY.get_sample_value(
            "backupd_backup_runs_total", {"job": "shop", "method": "logical", "type": "full", "result": "success"}) or 0.0

    before = runs()
    ctx = JobContext(load_settings(sqlite_job.config), "shop")
    try:
        manifest = run_backup(ctx)
    finally:
        ctx.close()
    assert runs() == before + 1
    assert metrics.REGISTRY.get_sample_value("backupd_backup_last_size_bytes", {
        "job": "shop", "method": "logical", "type": "full", "kind": "raw"}) == manifest.raw_size
