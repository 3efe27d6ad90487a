"""MariaDB physical diff and incr backups (``mariadb-backup --incremental-lsn``) against a real throwaway
mariadbd, through the real CLI: sizes, the LSN chain, PITR from the incr chain, verify, retention of the chain,
and a backup whose parent is gone refused naming it."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from core_fixtures import Keys
from mysql_support import Mariadb, scratch_server, started, wait_for, writing
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
        source: Mariadb, tmp_path: Path, keys: Keys, reachable: Path) -> None:
    """Applying such an increment renames the new tablespace from the increment's directory into the copy:
    in the verification sandbox both must be one mount (it failed with EXDEV when each was bound apart)."""
    source.sql("CREATE DATABASE inc5", *(f"CREATE TABLE inc5.{name} (id INT PRIMARY KEY)"
                                         for name in ("kept", "emptied", "dropped", "renamed")))
    source.sql(*(f"INSERT INTO {name} SELECT seq FROM seq_1_to_1000" for name in ("kept", "emptied", "dropped", "renamed")),
               database="inc5")
    job = make_job(tmp_path, keys, source, ["inc5"], method="physical")
    backup(job)
    source.sql("CREATE TABLE inc5.added (id INT PRIMARY KEY)", "INSERT INTO inc5.added VALUES (1), (2)",
               "TRUNCATE TABLE inc5.emptied", "INSERT INTO inc5.emptied VALUES (7)", "DROP TABLE inc5.dropped",
               "RENAME TABLE inc5.renamed TO inc5.moved", "ALTER TABLE inc5.kept ADD COLUMN v INT")
    incr = backup(job, "--type", "incr")

    verified = run_backupd("verify", "shop", "--backup", incr, config=job.config, timeout=600)
    assert verified.code == 0, verified.out + verified.err
    expected = {"inc5.kept": 1000, "inc5.emptied": 1, "inc5.added": 2, "inc5.moved": 1000}
    assert manifest(job, incr)["row_counts"] in ({}, expected)
    restored = run_backupd("restore", "shop", "--to", str(reachable / "datadir"), config=job.config, timeout=600)
    assert restored.code == 0, restored.err
    found = rows(reachable / "datadir", reachable / "run",
                 "SELECT (SELECT GROUP_CONCAT(table_name ORDER BY table_name) FROM information_schema.tables "
                 "WHERE table_schema = 'inc5'), (SELECT COUNT(*) FROM inc5.kept), (SELECT COUNT(*) FROM inc5.emptied), "
                 "(SELECT COUNT(*) FROM inc5.added), (SELECT COUNT(*) FROM inc5.moved)")
    assert found == [("added,emptied,kept,moved", 1000, 1, 2, 1000)]


def test_an_incr_counts_no_rows_and_verifies_without_counts(source: Mariadb, tmp_path: Path, keys: Keys) -> None:
    """A count reads every row; an incr's copy stores only the changed pages, so it counts nothing, on a quiet
    server (where a full counts during its copy) and under writes (where a full counts after it)."""
    source.sql("CREATE DATABASE inc3", "CREATE TABLE inc3.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT)")
    source.sql("INSERT INTO t (v) SELECT seq FROM seq_1_to_5000", database="inc3")
    job = make_job(tmp_path, keys, source, ["inc3"], method="physical")
    backup(job)
    quiet_incr = backup(job, "--type", "incr")
    with writing(source, "inc3.t"):
        busy_incr = backup(job, "--type", "incr")
    for incr in (quiet_incr, busy_incr):
        shown = manifest(job, incr)
        assert shown["metadata"]["type"] == "incr" and shown["row_counts"] == {}
        assert shown["metadata"]["row_counts_note"] == (
            "not counted: a diff or incr copies only the pages changed since its parent; a count reads every row")

    verified = run_backupd("verify", "shop", "--backup", busy_incr, config=job.config, timeout=600)
    assert verified.code == 0, verified.out + verified.err
@pytest.mark.parametrize("after_restore", ["nothing", "enough writes to pass the newest backup's LSN"])
def test_an_incr_after_the_server_went_back_to_an_earlier_point_takes_a_full(
        tmp_path: Path, keys: Keys, reachable: Path, after_restore: str) -> None:
    """The bad day: the server is restored to an older backup and keeps its server id. An incr against the
    newest backup (of the lost history) would miss every page changed since the restore point whose LSN is
    below that backup's. A full is taken instead, with a warning naming the parent and why."""
    server = started(log_bin=True, server_id=41)
    try:
        server.sql("CREATE DATABASE back", "CREATE TABLE back.t (id INT AUTO_INCREMENT PRIMARY KEY, v TEXT)")
        server.sql("INSERT INTO t (v) SELECT repeat('a', 100) FROM seq_1_to_1000", database="back")
        job = make_job(tmp_path, keys, server, ["back"], method="physical")
        older = backup(job)
        server.sql("INSERT INTO t (v) SELECT repeat('b', 100) FROM seq_1_to_1000", database="back")
        newest = backup(job, "--type", "incr")

        restored = run_backupd("restore", "shop", "--backup", older, "--to", str(reachable / "older"),
                               config=job.config, timeout=300)
        assert restored.code == 0, restored.err
        server.stop()
        shutil.rmtree(server.datadir)
        shutil.move(str(reachable / "older"), str(server.datadir))
        server.start()
        assert server.count("back.t") == 1000
        if after_restore != "nothing":
            newest_lsn = manifest(job, newest)["metadata"]["last_lsn"]  # where its copy ended
            while int(server.sql("SHOW GLOBAL STATUS LIKE 'Innodb_lsn_current'")[0][1]) <= newest_lsn:
                server.sql("INSERT INTO t (v) SELECT repeat('c', 1000) FROM seq_1_to_2000", database="back")

        taken = run_backupd("backup", "shop", "--type", "incr", config=job.config)
        assert taken.code == 0, taken.out + taken.err
        full = taken.out.strip()
        assert manifest(job, full)["metadata"]["type"] == "full" and manifest(job, full)["metadata"]["parent"] is None
        warning = next(json.loads(line) for line in taken.err.splitlines() if '"warning"' in line)
        assert warning["event"].startswith(f"taking a full backup instead of an incr: backup {newest} is not in this "
                                           "server's history (")
        assert ("LSN" if after_restore == "nothing" else "GTID") in warning["event"], warning

        server.sql("INSERT INTO t (v) VALUES ('d')", database="back")
        incr = backup(job, "--type", "incr")
        assert manifest(job, incr)["metadata"]["parent"] == full
        counted = run_backupd("restore", "shop", "--backup", incr, "--to", str(reachable / "again"),
                              config=job.config, timeout=300)
        assert counted.code == 0, counted.err
        total = server.count("back.t")
        assert rows(reachable / "again", reachable / "again-run", "SELECT COUNT(*) FROM back.t") == [(total,)]
    finally:
        server.destroy()


def test_an_incr_of_a_replica_is_an_incr(tmp_path: Path, keys: Keys) -> None:
    """A replica without log_slave_updates binlogs none of what it replicates: its gtid_binlog_pos lacks the
    domain that mariadb-backup records (gtid_current_pos). That is one continuous history, not a restore."""
    primary, replica = started(log_bin=True, server_id=51), started(log_bin=True, server_id=52)
    try:
        primary.sql("CREATE DATABASE rep", "CREATE TABLE rep.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT)",
                    "INSERT INTO rep.t (v) VALUES (1), (2)")
        replica.sql(f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={primary.port}, MASTER_USER='root', "
                    "MASTER_USE_GTID=slave_pos", "START SLAVE")

        def caught_up() -> bool:
            return replica.sql("SELECT @@gtid_slave_pos")[0][0] == primary.sql("SELECT @@gtid_binlog_pos")[0][0]

        wait_for(caught_up, 60, "the replica caught up")
        # what it replicated is not in its binlog: the two positions differ, in the one domain both use
        assert replica.sql("SELECT @@gtid_binlog_pos")[0][0] != replica.sql("SELECT @@gtid_current_pos")[0][0]
        job = make_job(tmp_path, keys, replica, ["rep"], method="physical")
        full = backup(job)
        primary.sql("INSERT INTO rep.t (v) VALUES (3)")
        wait_for(caught_up, 60, "the replica caught up")
        taken = run_backupd("backup", "shop", "--type", "incr", config=job.config)
        assert taken.code == 0, taken.err
        assert '"warning"' not in taken.err, taken.err
        shown = manifest(job, taken.out.strip())["metadata"]
        assert (shown["type"], shown["parent"]) == ("incr", full)
    finally:
        replica.destroy()
        primary.destroy()

def test_a_parents_hostile_binlog_coordinates_are_not_compared_or_echoed() -> None:
    from drivers.mysql.physical import parent_lsn

    good = {"to_lsn": 5, "last_lsn": 9, "server": "1",
            "binlog": {"file": "mysql-bin.000001", "position": 4, "gtid": "0-1-5,1-2-7"}}
    assert parent_lsn("b", good).binlog == ("mysql-bin.000001", 4, "0-1-5,1-2-7")
    assert parent_lsn("b", good).end == 9
    for bad in ({"gtid": "0-1-5\nbackupd: error: forged"}, {"file": "../x\n"}, {"position": True}):
        hostile = {**good, "binlog": {**good["binlog"], **bad}}
        assert parent_lsn("b", hostile).binlog is None
    assert parent_lsn("b", {**good, "last_lsn": 2}).end == 5  # never below its own checkpoint
