"""The daemon end to end on MariaDB: scheduled dumps plus the supervised binlog
archiver, then a restore that reaches the newest archived event."""

from __future__ import annotations

import json
import signal
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
