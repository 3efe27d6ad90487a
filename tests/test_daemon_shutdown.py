"""SIGTERM/SIGINT: drain running jobs, abort past the timeout or on a second signal, exit 0 cleanly.

The job uses the test driver ``slowtest`` (tests/plugins): its backup streams a
child process that trickles random bytes, so a backup is reliably in the middle
of an S3 multipart upload when the signal arrives.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from core_fixtures import Keys
from daemon_support import DaemonProcess, free_port, pid_alive, start_daemon  # noqa: F401 (fixture)
from s3_server import client, dangling_uploads
from support import write_config

MiB = 1 << 20


def slow_config(tmp_path: Path, keys: Keys, port: int, endpoint: str, bucket: str, *, size: int, rate: int,
                shutdown_timeout: str, extra_job: dict | None = None) -> Path:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state"), "metrics_listen": f"127.0.0.1:{port}",
                   "shutdown_timeout": shutdown_timeout},
        "storage.s3": {"type": "s3", "bucket": bucket, "prefix": "prod/", "endpoint_url": endpoint,
                       "part_size": 5 * MiB},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.slow": {"driver": "slowtest", "workdir": str(workdir), "size": size, "rate": rate,
                      "storage": "s3", "schedule": "@every 1s", **(extra_job or {})},
    })


def keys_in(endpoint: str, bucket: str) -> list[str]:
    return [o["Key"] for o in client(endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])]


def manifests(endpoint: str, bucket: str) -> list[str]:
    return [k for k in keys_in(endpoint, bucket) if k.endswith("/manifest.json")]


def start_slow_backup(start_daemon, tmp_path: Path, config: Path, port: int, endpoint: str,
                      bucket: str) -> tuple[DaemonProcess, int]:
    d = start_daemon(config, port)
    d.wait_for(lambda: dangling_uploads(endpoint, bucket), timeout=60, what="a multipart upload in progress")
    return d, int((tmp_path / "work" / "child.pid").read_text())


@pytest.mark.parametrize("how", ["timeout", "second-signal"])
def test_stop_aborts_a_slow_backup_cleanly(tmp_path: Path, keys: Keys, moto_server: str, s3_bucket: str,
                                           start_daemon, how: str) -> None:
    port = free_port()
    config = slow_config(tmp_path, keys, port, moto_server, s3_bucket, size=400 * MiB, rate=8 * MiB,
                         shutdown_timeout="1s" if how == "timeout" else "10m")
    d, child = start_slow_backup(start_daemon, tmp_path, config, port, moto_server, s3_bucket)
    assert pid_alive(child)

    started = time.monotonic()
    d.signal(signal.SIGTERM if how == "timeout" else signal.SIGINT)
    if how == "second-signal":
        d.wait_for(lambda: d.health()[0] == 503, what="draining")  # first signal: still draining
        assert d.health()[1]["reasons"] == ["daemon is stopping"]
        d.signal(signal.SIGTERM)
    assert d.wait_exit(30) == 0
    assert time.monotonic() - started < 20
    assert not pid_alive(child), "the backup's child process outlived the daemon"
    assert manifests(moto_server, s3_bucket) == []
    assert dangling_uploads(moto_server, s3_bucket) == []
    assert [k for k in keys_in(moto_server, s3_bucket) if "/backups/" in k] == [], "aborted backup's objects left"
    audit_keys = [k for k in keys_in(moto_server, s3_bucket) if k.startswith("prod/slow/audit/")]
    assert audit_keys, "the aborted run is in the audit trail"
    records = d.records()
    assert any(r.get("event") == "aborting running jobs" for r in records)
    assert any(r.get("event") == "daemon stopped" for r in records)

    # The next start backs up normally.
    config = slow_config(tmp_path, keys, port, moto_server, s3_bucket, size=MiB, rate=64 * MiB,
                         shutdown_timeout="10s")
    d = start_daemon(config, port)
    d.wait_for(lambda: manifests(moto_server, s3_bucket), what="a committed backup")
    assert d.stop() == 0
    assert dangling_uploads(moto_server, s3_bucket) == []


def test_stop_lets_a_running_backup_finish_within_the_timeout(tmp_path: Path, keys: Keys, moto_server: str,
                                                               s3_bucket: str, start_daemon) -> None:
    port = free_port()
    config = slow_config(tmp_path, keys, port, moto_server, s3_bucket, size=24 * MiB, rate=8 * MiB,
                         shutdown_timeout="60s")
    d, child = start_slow_backup(start_daemon, tmp_path, config, port, moto_server, s3_bucket)
    d.signal(signal.SIGTERM)
    assert d.wait_exit(60) == 0
    assert len(manifests(moto_server, s3_bucket)) == 1  # drained: the backup committed
    assert dangling_uploads(moto_server, s3_bucket) == []
    assert not pid_alive(child)
    assert not any(r.get("event") == "aborting running jobs" for r in d.records())


def test_job_timeout_aborts_the_run_and_the_daemon_goes_on(tmp_path: Path, keys: Keys, moto_server: str,
                                                          s3_bucket: str, start_daemon) -> None:
    port = free_port()
    config = slow_config(tmp_path, keys, port, moto_server, s3_bucket, size=400 * MiB, rate=16 * MiB,
                         shutdown_timeout="10s", extra_job={"timeout": "4s"})
    d, child = start_slow_backup(start_daemon, tmp_path, config, port, moto_server, s3_bucket)
    d.wait_for(lambda: d.metric("backupd_backup_runs_total", job="slow", method="logical", type="full", result="failure"),
               what="the timed-out run counted as failed")
    failed = d.wait_for(lambda: [r for r in d.records() if r.get("event") == "scheduled run failed"],
                        what="the failure logged")
    assert "timed out after 4 s and was aborted (jobs.slow.timeout)" in failed[0]["error"]
    d.wait_for(lambda: not pid_alive(child), timeout=10, what="the child killed")
    d.wait_for(lambda: not dangling_uploads(moto_server, s3_bucket) or None, timeout=10, what="upload aborted")
    assert manifests(moto_server, s3_bucket) == []
    assert d.health()[0] == 200
    assert d.stop() == 0
