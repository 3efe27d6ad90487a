"""Binlog archiving and point-in-time restore against real mariadbd instances.

The archiver runs in a thread exactly as the daemon runs it; backups and
restores go through the real CLI.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from backupd import metrics
from core_fixtures import Keys
from drivers.mysql import binlog
from mysql_support import Mariadb, scratch_server, started, wait_for
from support import run_backupd
from test_mysql_driver import RunningArchiver, backup, make_job, manifest, reachable, restore, tools  # noqa: F401

pytestmark = pytest.mark.usefixtures("tools")


@pytest.fixture(scope="module")
def source() -> Iterator[Mariadb]:
    server = started(log_bin=True, server_id=21)
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def target() -> Iterator[Mariadb]:
    server = started(log_bin=False, server_id=22)
    try:
        yield server
    finally:
        server.destroy()


def next_second() -> dt.datetime:
    """Wait until the wall clock enters a new second; return that second (binlog time resolution)."""
    now = time.time()
    boundary = int(now) + 1
    time.sleep(boundary - now)
    return dt.datetime.fromtimestamp(boundary, dt.timezone.utc)


def test_pitr_by_time_position_and_gtid(source: Mariadb, target: Mariadb, tmp_path: Path, keys: Keys) -> None:
    source.sql("CREATE DATABASE pitr1", "CREATE TABLE pitr1.marks (id INT PRIMARY KEY, phase VARCHAR(8))",
               "INSERT INTO pitr1.marks VALUES (1, 'base')")
    job = make_job(tmp_path, keys, source, ["pitr1"], archive_logs=True, binlog_flush_interval="1s")
    with RunningArchiver(job) as archiver:
        backup_id = backup(job)
        meta = manifest(job, backup_id)["metadata"]
        assert meta["pitr"]["log_kind"] == "binlog"
        assert meta["pitr"]["first_log"] == f"21/{meta['binlog']['file']}"
        source.sql("INSERT INTO pitr1.marks VALUES (2, 'before')", "INSERT INTO pitr1.marks VALUES (3, 'before')")
        gtid = source.sql("SELECT @@gtid_binlog_pos")[0][0]
        file, pos = source.master_status()
        moment = next_second()
        source.sql("INSERT INTO pitr1.marks VALUES (4, 'after')", "DROP TABLE pitr1.marks")
        archiver.wait_archived(source)

    stamp = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    plan = run_backupd("restore", "shop", "--to", target.url(), "--target-time", stamp, "--dry-run",
                       config=job.config, check=True).out
    assert backup_id in plan and f"21/{meta['binlog']['file']}" in plan and "one mysqlbinlog" in plan

    for option, value in (("--target-time", stamp), ("--target-position", f"{file}:{pos}"),
                          ("--target-gtid", gtid)):
        out = restore(job, target, option, value, "--clean")
        assert "replayed" in out, out
        rows = target.sql("SELECT id, phase FROM pitr1.marks ORDER BY id")
        assert rows == [(1, "base"), (2, "before"), (3, "before")], (option, rows)

    restore(job, target, "--clean")  # no target: the newest state, where the table was dropped
    assert target.sql("SHOW TABLES FROM pitr1") == []

    early = run_backupd("restore", "shop", "--to", target.url(), "--target-time", "2001-01-01T00:00:00Z",
                        config=job.config)
    assert early.code == 2 and "before the oldest usable backup" in early.err


def test_replay_spans_rotations_with_a_temporary_table(source: Mariadb, target: Mariadb, tmp_path: Path,
                                                       keys: Keys) -> None:
    source.sql("CREATE DATABASE pitr2", "CREATE TABLE pitr2.facts (id INT PRIMARY KEY, v INT)")
    job = make_job(tmp_path, keys, source, ["pitr2"], archive_logs=True, binlog_flush_interval="1s")
    with RunningArchiver(job) as archiver:
        backup(job)
        first, _ = source.master_status()
        conn = source.connect("pitr2")
        try:
            with conn.cursor() as cur:
                cur.execute("SET SESSION binlog_format = 'STATEMENT'")  # so the temp table itself is logged
                cur.execute("CREATE TEMPORARY TABLE scratch (id INT PRIMARY KEY, v INT)")
                cur.execute("INSERT INTO scratch VALUES (1, 10), (2, 20)")
                cur.execute("FLUSH BINARY LOGS")
                cur.execute("INSERT INTO scratch VALUES (3, 30)")
                cur.execute("FLUSH BINARY LOGS")
                cur.execute("INSERT INTO facts SELECT id, v FROM scratch")
        finally:
            conn.close()
        last = archiver.wait_archived(source)
    assert binlog.split_name(last.split("/")[1])[1] - binlog.split_name(first)[1] >= 2
    out = restore(job, target)
    assert "3 binlog file(s) replayed" in out or "4 binlog file(s) replayed" in out, out
    assert target.sql("SELECT id, v FROM pitr2.facts ORDER BY id") == [(1, 10), (2, 20), (3, 30)]


def test_archiver_survives_sigkill_and_server_restart_without_gap(source: Mariadb, target: Mariadb,
                                                                  tmp_path: Path, keys: Keys) -> None:
    source.sql("CREATE DATABASE pitr3", "CREATE TABLE pitr3.t (id INT PRIMARY KEY)", "INSERT INTO pitr3.t VALUES (1)")
    job = make_job(tmp_path, keys, source, ["pitr3"], archive_logs=True, binlog_flush_interval="1s")
    gaps_before = metrics.ARCHIVE_GAPS.labels("shop")._value.get()
    with RunningArchiver(job) as running:
        backup(job)
        archiver = running.archiver
        wait_for(lambda: archiver.process is not None, 30, "mysqlbinlog running")
        source.sql("INSERT INTO pitr3.t VALUES (2)")
        sessions = archiver.sessions
        os.kill(archiver.process.proc.pid, signal.SIGKILL)
        wait_for(lambda: archiver.sessions > sessions and archiver.process is not None, 30, "restart after SIGKILL")
        source.sql("INSERT INTO pitr3.t VALUES (3)")

        sessions = archiver.sessions
        source.stop()
        source.start()
        wait_for(lambda: archiver.sessions > sessions and archiver.process is not None, 60, "restart after server restart")
        source.sql("INSERT INTO pitr3.t VALUES (4)")
        # The open file reaches storage as a partial object within the flush interval, before any rotation.
        file, _ = source.master_status()
        partial = f"21/{file}.partial"
        wait_for(lambda: partial in running.names(), 30, f"{partial} pushed")
        running.wait_archived(source)
        assert metrics.ARCHIVE_LAST_SUCCESS.labels("shop")._value.get() > time.time() - 60

    assert metrics.ARCHIVE_GAPS.labels("shop")._value.get() == gaps_before
    indexes = sorted(binlog.split_name(name.split("/")[1].removesuffix(".partial"))[1] for name in running.names())
    assert indexes == list(range(indexes[0], indexes[-1] + 1)) or len(set(indexes)) == indexes[-1] - indexes[0] + 1
    verify = run_backupd("verify", "shop", config=job.config, timeout=300)
    assert verify.code == 0, verify.out + verify.err
    restore(job, target)
    assert [r[0] for r in target.sql("SELECT id FROM pitr3.t ORDER BY id")] == [1, 2, 3, 4]


def test_restore_refuses_to_cross_a_gap(source: Mariadb, target: Mariadb, tmp_path: Path, keys: Keys) -> None:
    source.sql("CREATE DATABASE pitr4", "CREATE TABLE pitr4.t (id INT PRIMARY KEY)")
    job = make_job(tmp_path, keys, source, ["pitr4"], archive_logs=True, binlog_flush_interval="1s")
    with RunningArchiver(job) as running:
        backup(job)
        running.wait_archived(source)
        source.sql("INSERT INTO pitr4.t VALUES (1)")
        middle = running.wait_archived(source)
        source.sql("INSERT INTO pitr4.t VALUES (2)")
        running.wait_archived(source)
        running.archive.delete(middle)
    result = run_backupd("restore", "shop", "--to", target.url(), config=job.config)
    assert result.code == 1
    assert f"missing binlog {middle}" in result.err
    assert target.sql("SHOW DATABASES LIKE 'pitr4'") == []  # nothing loaded before the plan failed
    verify = run_backupd("verify", "shop", config=job.config, timeout=300)
    assert verify.code == 3 and f"missing binlog {middle}" in verify.out + verify.err

    # `status` shows the window broken there, and the failed verification, from storage alone:
    # a host with its own, empty state_dir (disaster recovery) sees the same.
    elsewhere = tmp_path / "dr.toml"
    elsewhere.write_text(job.config.read_text().replace(str(tmp_path / "state"), str(tmp_path / "dr-state")))
    for config in (job.config, elsewhere):
        [status] = json.loads(run_backupd("status", "shop", "--json", config=config, check=True).out)["jobs"]
        assert status["state"] == "error"
        assert status["pitr"]["breaks"] == [f"missing binlog {middle}"]
        assert status["archive"]["kind"] == "binlog" and status["archive"]["count"] >= 2
        assert status["verification"]["result"] == "failed"
        assert any(p.startswith("the PITR window is broken: missing binlog") for p in status["problems"])
    assert not (tmp_path / "dr-state" / "audit.log").exists()  # reading changes nothing


def test_physical_backup_rolled_forward_to_a_position(source: Mariadb, tmp_path: Path, keys: Keys,
                                                     reachable: Path) -> None:
    source.sql("CREATE DATABASE pitr5", "CREATE TABLE pitr5.t (id INT PRIMARY KEY)", "INSERT INTO pitr5.t VALUES (1)")
    job = make_job(tmp_path, keys, source, ["pitr5"], method="physical", archive_logs=True,
                   binlog_flush_interval="1s")
    with RunningArchiver(job) as running:
        backup(job)
        source.sql("INSERT INTO pitr5.t VALUES (2)")
        file, pos = source.master_status()
        source.sql("INSERT INTO pitr5.t VALUES (3)")
        running.wait_archived(source)
    dest = reachable / "datadir"  # the roll-forward's scratch server runs as mysql
    out = run_backupd("restore", "shop", "--to", str(dest), "--target-position", f"{file}:{pos}",
                      config=job.config, timeout=300)
    assert out.code == 0, out.err
    assert "replayed" in out.out
    with scratch_server(dest, reachable / "run") as server:
        conn = server.credentials.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT id FROM pitr5.t ORDER BY id")
                assert [r[0] for r in cur.fetchall()] == [1, 2]
        finally:
            conn.close()


def test_a_binlog_gap_refuses_targets_past_it(source: Mariadb, target: Mariadb, tmp_path: Path, keys: Keys) -> None:
    """A binlog missing from the middle of the archive: past it is refused (exit 1, naming it); before it restores."""
    source.sql("CREATE DATABASE gap1", "CREATE TABLE gap1.marks (id INT PRIMARY KEY, phase VARCHAR(8))",
               "INSERT INTO gap1.marks VALUES (1, 'base')")
    job = make_job(tmp_path, keys, source, ["gap1"], archive_logs=True, binlog_flush_interval="1s")
    with RunningArchiver(job) as archiver:
        backup(job)
        source.sql("INSERT INTO gap1.marks VALUES (2, 'a')")
        before = next_second()
        source.sql("FLUSH BINARY LOGS")
        lost, _ = source.master_status()
        source.sql("INSERT INTO gap1.marks VALUES (3, 'b')", "FLUSH BINARY LOGS")
        source.sql("INSERT INTO gap1.marks VALUES (4, 'c')")
        after = next_second()
        source.sql("FLUSH BINARY LOGS")
        archiver.wait_archived(source)
    victim = next(job.repo.rglob(f"{lost}.zst.age"))
    victim.unlink()

    for extra in ([], ["--target-time", after.strftime("%Y-%m-%dT%H:%M:%SZ")]):
        refused = run_backupd("restore", "shop", "--to", target.url(), "--clean", *extra, config=job.config)
        assert refused.code == 1, refused.out + refused.err
        assert f"missing binlog 21/{lost}" in refused.err and "gap" in refused.err
        dry = run_backupd("restore", "shop", "--to", target.url(), "--clean", "--dry-run", *extra, config=job.config)
        assert dry.code == 1 and lost in dry.err

    restore(job, target, "--target-time", before.strftime("%Y-%m-%dT%H:%M:%SZ"), "--clean")
    assert target.sql("SELECT id FROM gap1.marks ORDER BY id") == [(1,), (2,)]
    out = restore(job, target, "--to-gap", "--clean")
    assert "--to-gap" in out and lost in out
    assert target.sql("SELECT id FROM gap1.marks ORDER BY id") == [(1,), (2,)]

    listed = run_backupd("list", "shop", "--json", config=job.config, check=True).out
    assert f"21/{lost}" in listed  # broken_at names the first missing binlog
