"""WAL archiving with the daemon running: archive_command hands segments to it, the
push-ahead archiver works from archive_status, and without the daemon wal-push
still archives by itself."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from daemon_support import DaemonProcess
from pg_fixtures import BACKUPD_EXE, JOB, PgEnv, pg_env  # noqa: F401
from s3_server import free_port

ARCHIVE_LOGS = True


class PostgresUserDaemon(DaemonProcess):
    """``backupd run`` as the postgres OS user (as archive_command runs), exec'd directly so signals reach it."""

    def __init__(self, env: PgEnv, port: int, log: Path) -> None:
        self.config = env.config
        self.port = port
        self.log = log
        self._log_handle = open(log, "ab")
        argv = [shutil.which("setpriv") or "setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--",
                str(BACKUPD_EXE), "--config", str(env.config), "--log-format", "json", "run"]
        self.proc = subprocess.Popen(argv, cwd="/tmp", stdout=self._log_handle, stderr=subprocess.STDOUT,
                                     env={**os.environ, "BACKUPD_DAEMON__METRICS_LISTEN": f"127.0.0.1:{port}"})


def archived_segments(env: PgEnv) -> set[str]:
    return {p.name.removesuffix(".zst.age") for p in (env.repo / JOB / "wal").rglob("*.zst.age")}


def test_archive_command_goes_through_the_running_daemon(pg_env: PgEnv, tmp_path: Path) -> None:
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to run the daemon as postgres")
    daemon = PostgresUserDaemon(pg_env, free_port(), tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        pg_env.sql("CREATE TABLE IF NOT EXISTS through_daemon (id int)")
        pg_env.sql("INSERT INTO through_daemon SELECT generate_series(1, 1000)")
        first = pg_env.switch_and_wait_archived()
        second = pg_env.switch_and_wait_archived()
        assert {first, second} <= archived_segments(pg_env)
        # The daemon's own registry saw the pushes (fast path or push-ahead): they ran in the daemon.
        last = daemon.wait_for(lambda: daemon.metric("backupd_archive_last_success_timestamp_seconds", job=JOB),
                               what="archive metric in the daemon")
        assert last > time.time() - 120
        handled = {r.get("name", "").rpartition("/")[2] for r in daemon.records()
                   if r.get("op") == "wal-push" and r.get("event") == "wal-push answered"}
        assert first in handled, "archive_command did not hand the segment to the daemon"
        status, health = daemon.health()
        assert status == 200, health
        failed = pg_env.sql("SELECT failed_count FROM pg_stat_archiver", dbname="postgres")[0][0]
        assert failed == 0
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(60) == 0
    finally:
        daemon.kill()
    assert not (pg_env.state_dir / "control.sock").exists()
    # No daemon: wal-push uploads by itself and PostgreSQL keeps archiving.
    third = pg_env.switch_and_wait_archived()
    assert third in archived_segments(pg_env)


def test_healthz_reports_failing_pushes(pg_env: PgEnv, tmp_path: Path) -> None:
    """The archiver process runs, but every push fails (the repository's disk is full): /healthz says so."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to run the daemon as postgres")
    wal = pg_env.repo / JOB / "wal"
    daemon = PostgresUserDaemon(pg_env, free_port(), tmp_path / "daemon.log")
    full = tmp_path / "full"
    try:
        daemon.wait_ready()
        assert daemon.health()[0] == 200
        # Swap the WAL folder for a full file system (as the repository's disk filling up would).
        shutil.move(wal, tmp_path / "wal-saved")
        full.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0777", "tmpfs", str(full)], check=True)
        with open(full / "filler", "wb") as out:
            try:
                out.write(b"\0" * (1 << 20))
            except OSError:
                pass
        wal.symlink_to(full)
        pg_env.sql("CREATE TABLE IF NOT EXISTS during_full (id int)")
        pg_env.sql("INSERT INTO during_full SELECT generate_series(1, 1000)")
        pg_env.sql("SELECT pg_switch_wal()", dbname="postgres")
        status, health = daemon.wait_for(lambda: (lambda h: h if h[0] == 503 else None)(daemon.health()),
                                         what="/healthz 503 while pushes fail", timeout=60)
        assert any(f"log pushes of job {JOB} fail since" in reason for reason in health["reasons"]), health
        assert (daemon.metric("backupd_archive_failures_total", job=JOB) or 0) >= 1
        # Space again: the next push succeeds and health recovers.
        wal.unlink()
        shutil.move(tmp_path / "wal-saved", wal)
        pg_env.switch_and_wait_archived()
        daemon.wait_for(lambda: daemon.health()[0] == 200 or None, what="/healthz 200 again", timeout=60)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(60) == 0
    finally:
        daemon.kill()
        subprocess.run(["umount", "-l", str(full)], check=False)
        if wal.is_symlink():
            wal.unlink()
            shutil.move(tmp_path / "wal-saved", wal)
