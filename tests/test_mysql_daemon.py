"""The daemon end to end on MariaDB: scheduled dumps plus the supervised binlog
archiver, then a restore that reaches the newest archived event."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from core_fixtures import Keys
from daemon_support import start_daemon  # noqa: F401
from mysql_support import Mariadb, started, wait_for
from s3_server import free_port
from support import run_backupd
from test_mysql_driver import make_job, restore, tools  # noqa: F401

pytestmark = pytest.mark.usefixtures("tools")


@pytest.fixture
def servers() -> Iterator[tuple[Mariadb, Mariadb]]:
    source, target = started(log_bin=True, server_id=31), None
    try:
        target = started(log_bin=False, server_id=32)
        yield source, target
    finally:
        source.destroy()
        if target is not None:
            target.destroy()


def test_daemon_backs_up_and_archives_binlogs(servers, tmp_path: Path, keys: Keys, start_daemon) -> None:
    source, target = servers
    source.sql("CREATE DATABASE d1", "CREATE TABLE d1.t (id INT PRIMARY KEY)", "INSERT INTO d1.t VALUES (1)")
    job = make_job(tmp_path, keys, source, ["d1"], archive_logs=True, binlog_flush_interval="1s",
                   schedule="@every 1h")
    port = free_port()
    daemon = start_daemon(job.config, port, env={"BACKUPD_DAEMON__METRICS_LISTEN": f"127.0.0.1:{port}"})
    daemon.wait_ready()
    # A backup taken by hand while the daemon archives: they share the job lock, not the archiver.
    assert run_backupd("backup", "shop", config=job.config).code == 0
    source.sql("INSERT INTO d1.t VALUES (2)", "FLUSH BINARY LOGS", "INSERT INTO d1.t VALUES (3)")
    with_row_3, _ = source.master_status()
    source.sql("FLUSH BINARY LOGS")
    wait_for(lambda: any(p.name == f"{with_row_3}.zst.age" for p in (job.repo / "shop" / "binlog").glob("*/*")),
             timeout=60, what=f"{with_row_3} shipped complete by the daemon's archiver")
    assert daemon.wait_for(lambda: daemon.metric("backupd_archive_last_success_timestamp_seconds", job="shop"),
                           what="archive metric")
    status, health = daemon.health()
    assert status == 200, health
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(60) == 0

    restore(job, target)
    assert [row[0] for row in target.sql("SELECT id FROM d1.t ORDER BY id")] == [1, 2, 3]
    listing = json.loads(run_backupd("list", "--json", config=job.config, check=True).out)["backups"]
    assert listing[0]["pitr"]["log_kind"] == "binlog"


@pytest.fixture
def source() -> Iterator[Mariadb]:
    server = started(log_bin=True, server_id=33)
    try:
        yield server
    finally:
        server.destroy()


def test_binlog_lag_survives_a_reload_and_a_server_down_is_an_archiver_down(source: Mariadb, tmp_path: Path,
                                                                            keys: Keys, start_daemon) -> None:
    source.sql("CREATE DATABASE d1", "CREATE TABLE d1.t (id INT PRIMARY KEY)")
    # Partial files are flushed hourly: written events wait in the spool, and the lag shows their age.
    job = make_job(tmp_path, keys, source, ["d1"], archive_logs=True, binlog_flush_interval="1h")
    port = free_port()
    daemon = start_daemon(job.config, port, env={"BACKUPD_DAEMON__METRICS_LISTEN": f"127.0.0.1:{port}"})
    daemon.wait_ready()
    lag = lambda: daemon.metric("backupd_archive_lag_seconds", job="shop") or 0.0  # noqa: E731
    daemon.wait_for(lambda: [r for r in daemon.records() if r.get("event") == "binlog streaming started"],
                    what="streaming")
    time.sleep(1)
    source.sql("INSERT INTO d1.t VALUES (1)")
    daemon.wait_for(lambda: lag() >= 3, what="the lag of the unflushed event")

    # A reload with the same file restarts nothing: the lag goes on growing from where it was.
    before = lag()
    daemon.signal(signal.SIGHUP)
    daemon.wait_for(lambda: daemon.metric("backupd_config_reloads_total", result="success") == 1, what="reload")
    time.sleep(1.5)
    assert lag() >= before + 1
    assert len([r for r in daemon.records() if r.get("event") == "binlog streaming started"]) == 1

    # The server goes away for a while: the archiver is down (metric and /healthz) as long as it is.
    up = lambda: daemon.metric("backupd_archiver_up", job="shop", archiver="binlog:shop")  # noqa: E731
    assert up() == 1
    source.stop()
    down_at = time.time()
    daemon.wait_for(lambda: up() == 0, what="archiver down")
    for _ in range(20):
        status, health = daemon.health()
        assert status == 503 and up() == 0, health
        time.sleep(0.25)
    assert any("log archiver binlog:shop of job shop is retrying" in r for r in health["reasons"]), health
    assert lag() >= time.time() - down_at - 2  # at least as old as the moment the server was last reached

    source.start()
    daemon.wait_for(lambda: up() == 1, timeout=90, what="archiver up again")
    assert daemon.health()[0] == 200
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(60) == 0


def test_binlogs_purged_before_archiving_are_a_gap_everywhere(servers, tmp_path: Path, keys: Keys,
                                                               start_daemon) -> None:
    """Binlogs the server purged while the daemon was down: counted the moment the archiver starts again, and
    seen by list, status --json and restore --dry-run (which refuses, exit 1)."""
    source, target = servers
    source.sql("CREATE DATABASE p1", "CREATE TABLE p1.t (id INT PRIMARY KEY)", "INSERT INTO p1.t VALUES (1)")
    job = make_job(tmp_path, keys, source, ["p1"], archive_logs=True, binlog_flush_interval="1s",
                   schedule="@every 1h")
    port = free_port()
    env = {"BACKUPD_DAEMON__METRICS_LISTEN": f"127.0.0.1:{port}"}
    daemon = start_daemon(job.config, port, env=env)
    daemon.wait_ready()
    assert run_backupd("backup", "shop", config=job.config).code == 0
    source.sql("INSERT INTO p1.t VALUES (2)", "FLUSH BINARY LOGS")
    first, _ = source.master_status()
    wait_for(lambda: any(p.name.startswith(first) for p in (job.repo / "shop" / "binlog").glob("*/*")),
             timeout=60, what=f"{first} being archived")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(60) == 0

    # While no archiver runs, the server writes and purges binlogs nobody archived.
    source.sql("INSERT INTO p1.t VALUES (3)", "FLUSH BINARY LOGS", "INSERT INTO p1.t VALUES (4)", "FLUSH BINARY LOGS",
               "INSERT INTO p1.t VALUES (5)", "FLUSH BINARY LOGS")
    newest, _ = source.master_status()
    source.sql(f"PURGE BINARY LOGS TO '{newest}'")

    daemon = start_daemon(job.config, port, env=env)
    daemon.wait_ready()
    gaps = daemon.wait_for(lambda: daemon.metric("backupd_archive_gaps_total", job="shop") or None,
                           what="the purged binlogs counted as a gap", timeout=60)
    assert gaps >= 1
    # the archive shows the gap once a binlog after it is stored (the repository knows nothing of the server)
    wait_for(lambda: any(p.name.startswith(newest) for p in (job.repo / "shop" / "binlog").glob("*/*")),
             timeout=60, what=f"{newest} archived after the gap")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(60) == 0

    listed = json.loads(run_backupd("list", "--json", config=job.config, check=True).out)["backups"]
    assert listed[0]["pitr"]["broken_at"], listed[0]["pitr"]
    status = json.loads(run_backupd("status", "shop", "--json", config=job.config).out)
    text = json.dumps(status)
    assert "missing binlog" in text, text
    dry = run_backupd("restore", "shop", "--to", target.url(), "--dry-run", config=job.config)
    assert dry.code == 1 and "missing binlog" in dry.err and "gap" in dry.err, dry.err
