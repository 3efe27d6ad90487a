"""A backup killed mid-upload leaves no manifest; list ignores it; the next one succeeds."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from core_fixtures import SqliteJob, sqlite_job_config
from support import BACKUPD, REPO_ROOT, run_backupd


def big_db(path: Path, megabytes: int) -> None:
    db = sqlite3.connect(path)
    db.execute("create table blobs (id integer primary key, data blob)")
    with db:
        for i in range(megabytes):
            db.execute("insert into blobs (data) values (?)", (os.urandom(1 << 20),))
    db.close()


def kill_during_upload(config: Path, watch) -> None:
    proc = subprocess.Popen([*BACKUPD, "--config", str(config), "backup", "shop"], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if watch():
                break
            time.sleep(0.005)
        assert proc.poll() is None, "backup finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_upload_on_filesystem(sqlite_job: SqliteJob) -> None:
    big_db(sqlite_job.db, 300)
    backups = sqlite_job.repo_root / "shop" / "backups"

    def uploading() -> bool:
        return any(p.name.startswith(".tmp-") and p.stat().st_size > (8 << 20) for p in backups.glob("*/*")) \
            if backups.exists() else False

    kill_during_upload(sqlite_job.config, uploading)
    assert not list(backups.glob("*/manifest.json"))
    assert not list(backups.glob("*/db.zst.age")), "a partial object is visible under its final name"
    assert json.loads(run_backupd("list", "--json", config=sqlite_job.config).out)["backups"] == []
    assert run_backupd("verify", "shop", "--integrity-only", config=sqlite_job.config).code == 1  # no backups yet

    backup_id = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    listed = json.loads(run_backupd("list", "--json", config=sqlite_job.config).out)["backups"]
    assert [b["backup_id"] for b in listed] == [backup_id]
    assert run_backupd("verify", "shop", "--integrity-only", config=sqlite_job.config).code == 0
    assert debris(backups) == []  # the next backup removed what the dead one left


def debris(backups: Path) -> list[str]:
    """Temp files and backup directories without a manifest under a job's backups/ folder."""
    found = [str(p) for p in backups.rglob(".tmp-*")]
    found += [str(d) for d in backups.iterdir() if d.is_dir() and not (d / "manifest.json").exists()]
    return found


def test_prune_without_a_policy_removes_what_a_killed_backup_left(sqlite_job: SqliteJob) -> None:
    big_db(sqlite_job.db, 300)
    kept = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    backups = sqlite_job.repo_root / "shop" / "backups"

    def uploading() -> bool:
        return any(p.name.startswith(".tmp-") and p.stat().st_size > (8 << 20) for p in backups.glob("*/*"))

    kill_during_upload(sqlite_job.config, uploading)
    assert debris(backups), "the killed backup left nothing to clean up"
    checked = run_backupd("verify", "shop", "--integrity-only", config=sqlite_job.config)
    assert checked.code == 0 and "note: dead runs left" in checked.out
    dry = run_backupd("prune", "shop", "--dry-run", "--json", config=sqlite_job.config, check=True)
    planned = json.loads(dry.out)
    left = planned["abandoned"]
    assert planned["no_policy"] and any(".tmp-" in key for key in left["temporary"]), left
    assert debris(backups), "a dry run removed something"

    pruned = run_backupd("prune", "shop", config=sqlite_job.config, check=True)
    assert "removed what dead runs left:" in pruned.out and "no retention policy" in pruned.out
    assert debris(backups) == []
    assert [b["backup_id"] for b in json.loads(run_backupd("list", "--json", config=sqlite_job.config).out)
            ["backups"]] == [kept]


def test_sigkill_mid_upload_on_s3(tmp_path: Path, keys, moto_server: str, s3_bucket: str) -> None:
    import boto3

    db = tmp_path / "shop.sqlite3"
    big_db(db, 120)
    config = sqlite_job_config(tmp_path, keys, {"type": "s3", "bucket": s3_bucket, "prefix": "prod/",
                                                "endpoint_url": moto_server, "part_size": 5 * 1024 * 1024}, db,
                              {"verify": {"checks": ["SELECT count(*) = 120 FROM blobs"]}})
    client = boto3.client("s3", endpoint_url=moto_server)

    def uploading() -> bool:
        return bool(client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"))

    kill_during_upload(config, uploading)
    keys_left = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert not [k for k in keys_left if k.endswith("manifest.json")]
    assert json.loads(run_backupd("list", "--json", config=config).out)["backups"] == []
    backup_id = run_backupd("backup", "shop", config=config, check=True).out.strip()
    listed = json.loads(run_backupd("list", "--json", config=config).out)["backups"]
    assert [b["backup_id"] for b in listed] == [backup_id]
    assert run_backupd("verify", "shop", config=config).code == 0
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")  # the killed upload was aborted


def test_sigint_mid_upload_exits_130_leaves_nothing_and_is_audited_as_interrupted(sqlite_job: SqliteJob) -> None:
    sqlite_job.db.unlink()
    big_db(sqlite_job.db, 200)
    backups = sqlite_job.repo_root / "shop" / "backups"
    proc = subprocess.Popen([*BACKUPD, "--config", str(sqlite_job.config), "--log-format", "json", "backup", "shop"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if backups.is_dir() and any(p.is_dir() and any(p.iterdir()) for p in backups.iterdir()):
            break  # the stream is being written
        time.sleep(0.005)
    assert proc.poll() is None, "backup finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 130, err
    assert out == "" and err.splitlines()[-1] == "backupd: interrupted"
    assert not backups.exists() or list(backups.iterdir()) == []  # no empty backup directory
    assert not (sqlite_job.repo_root / "_ids").exists() or list((sqlite_job.repo_root / "_ids").iterdir()) == []
    audit = [json.loads(line) for line in (sqlite_job.state_dir / "audit.log").read_text().splitlines()]
    assert audit[-1]["command"] == "backup" and audit[-1]["result"] == "interrupted"
    assert audit[-1]["exit_code"] == 130 and audit[-1]["detail"] == "interrupted by SIGINT"
    assert audit[-1]["backup_id"]  # names the backup that was abandoned
    assert json.loads(run_backupd("list", "--json", config=sqlite_job.config, check=True).out)["backups"] == []
