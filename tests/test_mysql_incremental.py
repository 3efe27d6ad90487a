"""MariaDB physical diff and incr backups (``mariadb-backup --incremental-lsn``) against a real throwaway
mariadbd, through the real CLI: sizes, the LSN chain, PITR from the incr chain, verify, retention of the chain,
and a backup whose parent is gone refused naming it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import pytest

from core_fixtures import Keys
from mysql_support import Mariadb, scratch_server, started
from support import error_lines, run_backupd
from test_mysql_driver import RunningArchiver, backup, make_job, manifest, reachable, tools  # noqa: F401
from test_mysql_pitr import next_second

pytestmark = pytest.mark.usefixtures("tools")
ROWS = 400_000


@pytest.fixture(scope="module")
def source() -> Iterator[Mariadb]:
    server = started(log_bin=True, server_id=31)
    try:
        yield server
    finally:
        server.destroy()


def checkpoint(server: Mariadb) -> None:
    """Flush every dirty page, as a server that has been up a while has: the copy's to_lsn moves up to now."""
    server.sql("SET GLOBAL innodb_max_dirty_pages_pct_lwm = 0", "SET GLOBAL innodb_max_dirty_pages_pct = 0")
    for _ in range(300):
        if int(server.sql("SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_pages_dirty'")[0][1]) == 0:
            return
        time.sleep(0.1)


def rows(datadir: Path, run: Path, sql: str) -> list[tuple]:
    with scratch_server(datadir, run) as server:
        conn = server.credentials.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return [tuple(row) for row in cur.fetchall()]
        finally:
            conn.close()


def test_diff_and_incr_chain_stores_little_and_restores_to_a_time(source: Mariadb, tmp_path: Path, keys: Keys,
                                                                  reachable: Path) -> None:
    source.sql("CREATE DATABASE inc1")
    source.sql("CREATE TABLE items (id INT PRIMARY KEY, note VARCHAR(64))",
               f"INSERT INTO items SELECT seq, md5(seq) FROM seq_1_to_{ROWS}",
               "CREATE TABLE marks (id INT PRIMARY KEY, phase VARCHAR(8))", database="inc1")
    checkpoint(source)
    job = make_job(tmp_path, keys, source, ["inc1"], method="physical", archive_logs=True,
                   binlog_flush_interval="1s", retention={"keep_last": 1})
    one_percent = ROWS // 100
    with RunningArchiver(job) as archiver:
        full = backup(job)
        source.sql(f"UPDATE inc1.items SET note = 'first' WHERE id <= {one_percent}")
        checkpoint(source)
        diff = backup(job, "--type", "diff")
        source.sql(f"UPDATE inc1.items SET note = 'second' WHERE id > {one_percent} AND id <= {2 * one_percent}")
        checkpoint(source)
        incr = backup(job, "--type", "incr")
        source.sql("INSERT INTO inc1.marks VALUES (1, 'before')")
        moment = next_second()
        source.sql("INSERT INTO inc1.marks VALUES (2, 'after')")
        archiver.wait_archived(source)

    shown = {backup_id: manifest(job, backup_id) for backup_id in (full, diff, incr)}
    meta = {backup_id: shown[backup_id]["metadata"] for backup_id in shown}
    assert [(meta[i]["type"], meta[i]["parent"]) for i in (full, diff, incr)] == [
        ("full", None), ("diff", full), ("incr", diff)]
    assert meta[full]["from_lsn"] == 0 < meta[full]["to_lsn"]
    assert meta[diff]["from_lsn"] == meta[full]["to_lsn"] < meta[diff]["to_lsn"]
    assert meta[incr]["from_lsn"] == meta[diff]["to_lsn"] < meta[incr]["to_lsn"]
    stored = {backup_id: shown[backup_id]["stored_size"] for backup_id in shown}
    assert stored[incr] < stored[full] / 10, stored
    assert stored[diff] < stored[full] / 10, stored

    listed = json.loads(run_backupd("list", "--json", config=job.config, check=True).out)["backups"]
    assert [(b["backup_id"], b["type"], b["parent"]) for b in listed] == [
        (incr, "incr", diff), (diff, "diff", full), (full, "full", None)]

    stamp = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    plan = run_backupd("restore", "shop", "--to", str(reachable / "datadir"), "--target-time", stamp, "--dry-run",
                       config=job.config, check=True).out
    assert f"backup chain: {full} (full) <- {diff} (diff) <- {incr} (incr)" in plan
    out = run_backupd("restore", "shop", "--to", str(reachable / "datadir"), "--target-time", stamp,
                      config=job.config, timeout=600)
    assert out.code == 0, out.err
    assert incr in out.out and "replayed" in out.out
    found = rows(reachable / "datadir", reachable / "run",
                 "SELECT (SELECT GROUP_CONCAT(id) FROM inc1.marks), COUNT(*), SUM(note = 'first'), "
                 "SUM(note = 'second') FROM inc1.items")
    assert found == [("1", ROWS, one_percent, one_percent)]

    verified = run_backupd("verify", "shop", "--backup", incr, config=job.config, timeout=600)
    assert verified.code == 0, verified.err
    integrity = run_backupd("verify", "shop", "--backup", incr, "--integrity-only", config=job.config)
    assert integrity.code == 0, integrity.err

    dry = run_backupd("prune", "shop", "--dry-run", config=job.config, check=True).out
    assert f"parent of {incr}" in dry and f"parent of {diff}" in dry
    run_backupd("prune", "shop", config=job.config, check=True)
    assert sorted(p.name for p in (job.repo / "shop" / "backups").iterdir()) == [full, diff, incr]


def test_a_backup_whose_parent_is_gone_is_refused_naming_it(source: Mariadb, tmp_path: Path, keys: Keys) -> None:
    source.sql("CREATE DATABASE inc2", "CREATE TABLE inc2.t (id INT PRIMARY KEY)", "INSERT INTO inc2.t VALUES (1)")
    job = make_job(tmp_path, keys, source, ["inc2"], method="physical")
    full = backup(job, "--type", "incr")  # no full yet: a full, with a warning
    assert manifest(job, full)["metadata"]["type"] == "full"
    first = backup(job, "--type", "incr")
    source.sql("INSERT INTO inc2.t VALUES (2)")
    second = backup(job, "--type", "incr")
    assert manifest(job, second)["metadata"]["parent"] == first
    (job.repo / "shop" / "backups" / first / "manifest.json").unlink()  # pruned by hand, or never committed

    refused = run_backupd("backup", "shop", "--type", "incr", config=job.config)
    assert refused.code == 1
    assert error_lines(refused.err)[0].endswith(
        f"backup {second} needs its parent backup {first}, which is missing from the repository")
    restored = run_backupd("restore", "shop", "--to", str(tmp_path / "datadir"), "--backup", second,
                           config=job.config)
    assert restored.code == 1 and first in error_lines(restored.err)[0]
    assert not (tmp_path / "datadir").exists()
    diff = backup(job, "--type", "diff")  # the full is still whole
    assert manifest(job, diff)["metadata"]["parent"] == full

    (tmp_path / "logical").mkdir()
    logical = make_job(tmp_path / "logical", keys, source, ["inc2"])
    wrong = run_backupd("backup", "shop", "--type", "diff", config=logical.config)
    assert wrong.code == 2 and "needs method physical" in wrong.err


def test_verify_applies_an_increment_holding_tables_created_or_rebuilt_since_its_parent(
        source: Mariadb, tmp_path: Path, keys: Keys) -> None:
    """Applying such an increment renames the new tablespace from the increment's directory into the copy:
    in the verification sandbox both must be one mount (it failed with EXDEV when each was bound apart)."""
    source.sql("CREATE DATABASE inc5", "CREATE TABLE inc5.kept (id INT PRIMARY KEY)",
               "CREATE TABLE inc5.emptied (id INT PRIMARY KEY)")
    source.sql("INSERT INTO kept SELECT seq FROM seq_1_to_1000", "INSERT INTO emptied SELECT seq FROM seq_1_to_1000",
               database="inc5")
    job = make_job(tmp_path, keys, source, ["inc5"], method="physical")
    backup(job)
    source.sql("CREATE TABLE inc5.added (id INT PRIMARY KEY)", "INSERT INTO inc5.added VALUES (1), (2)",
               "TRUNCATE TABLE inc5.emptied", "INSERT INTO inc5.emptied VALUES (7)")
    incr = backup(job, "--type", "incr")

    verified = run_backupd("verify", "shop", "--backup", incr, config=job.config, timeout=600)
    assert verified.code == 0, verified.out + verified.err
    counts = manifest(job, incr)["row_counts"]
    assert counts in ({}, {"inc5.kept": 1000, "inc5.emptied": 1, "inc5.added": 2}), counts

