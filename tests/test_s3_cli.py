"""The CLI against S3 (moto on 127.0.0.1): round trip, and clear errors when S3 is not there."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from core_fixtures import make_sample_db, sqlite_job_config
from support import error_lines, run_backupd


def s3_config(tmp_path: Path, keys, endpoint: str, bucket: str, **extra) -> tuple[Path, dict[str, int]]:
    db = tmp_path / "shop.sqlite3"
    counts = make_sample_db(db)
    table = {"type": "s3", "bucket": bucket, "prefix": "prod/", "endpoint_url": endpoint, **extra}
    return sqlite_job_config(tmp_path, keys, table, db), counts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_round_trip_through_s3(tmp_path: Path, keys, moto_server: str, s3_bucket: str) -> None:
    import sqlite3

    import boto3

    config, counts = s3_config(tmp_path, keys, moto_server, s3_bucket)
    backup_id = run_backupd("backup", "shop", config=config, check=True).out.strip()
    client = boto3.client("s3", endpoint_url=moto_server)
    stored = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="prod/shop/backups/")["Contents"])
    assert stored == [f"prod/shop/backups/{backup_id}/db.zst.age", f"prod/shop/backups/{backup_id}/manifest.json"]

    # A host that never saw the job: fresh state dir, nothing but the config and the key.
    other_state = tmp_path / "elsewhere"
    env = {"BACKUPD_DAEMON__STATE_DIR": str(other_state)}
    listed = json.loads(run_backupd("list", "--json", config=config, env=env, check=True).out)["backups"]
    assert [b["backup_id"] for b in listed] == [backup_id]
    assert run_backupd("verify", "shop", "--integrity-only", config=config, env=env).code == 0
    target = tmp_path / "restored.sqlite3"
    run_backupd("restore", "shop", "--to", str(target), config=config, env=env, check=True)
    db = sqlite3.connect(target)
    assert db.execute("select count(*) from orders").fetchone()[0] == counts["orders"]
    db.close()


def test_unreachable_endpoint_is_a_clear_error(tmp_path: Path, keys) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    config, _ = s3_config(tmp_path, keys, endpoint, "db-backups", max_attempts=2, connect_timeout=1)
    result = run_backupd("backup", "shop", config=config, timeout=60)
    assert result.code == 1
    lines = error_lines(result.err)
    assert lines[0].startswith("backupd: error: ") and endpoint in lines[0]
    listing = run_backupd("list", config=config, timeout=60)
    assert listing.code == 1 and endpoint in listing.err


def test_missing_bucket_is_a_clear_error(tmp_path: Path, keys, moto_server: str) -> None:
    config, _ = s3_config(tmp_path, keys, moto_server, "no-such-bucket-here")
    result = run_backupd("backup", "shop", config=config)
    assert result.code == 1
    assert "no-such-bucket-here" in error_lines(result.err)[0]
    assert "bucket does not exist" in result.err or "NoSuchBucket" in result.err
