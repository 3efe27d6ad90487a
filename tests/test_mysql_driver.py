"""The mysql driver against real throwaway mariadbd instances, through the real CLI.

One source server (binlog on, ROW) is shared by the module; each test works in
databases of its own and restores into a fresh target server.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from backupd.context import JobContext
from backupd.settings import load_settings
from core_fixtures import Keys
from mysql_support import PASSWORD, Mariadb, cmdlines, open_dir, scratch_server, started, wait_for, writing
from support import error_lines, require_tool, run_backupd, stored_report, write_config

pytestmark = pytest.mark.usefixtures("tools")


@pytest.fixture(scope="module")
def tools() -> None:
    for tool in ("mariadb-dump", "mariadb", "mariadb-binlog", "mariadb-backup", "mbstream"):
        require_tool(tool)


@pytest.fixture(scope="module")
def source() -> Iterator[Mariadb]:
    server = started(log_bin=True, server_id=11)
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def target() -> Iterator[Mariadb]:
    server = started(log_bin=False, server_id=12)
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def reachable() -> Iterator[Path]:
    """Where restored data directories go that a scratch server (running as mysql) starts on."""
    with open_dir() as path:
        yield path


@dataclass
class Job:
    config: Path
    name: str
    repo: Path
    password_file: Path

    def context(self) -> JobContext:
        return JobContext(load_settings(self.config), self.name)


def make_job(tmp_path: Path, keys: Keys, server: Mariadb, databases: list[str], password: str = PASSWORD,
             storage: dict[str, object] | None = None, **extra: object) -> Job:
    """A job on ``server`` (its repository on the filesystem, or in the given storage table)."""
    password_file = tmp_path / "mysql.pass"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    repo = tmp_path / "repo"
    config = write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": storage or {"type": "filesystem", "path": str(repo)},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.shop": {"driver": "mysql", "dsn": server.url(), "password_file": str(password_file), "storage": "main",
                      "databases": databases, **extra},
    })
    return Job(config, "shop", repo, password_file)


class RunningArchiver:
    """The job's binlog archiver in a thread, as the daemon would run it."""

    def __init__(self, job: Job) -> None:
        self.ctx = job.context()
        self.archiver = self.ctx.driver.log_archivers()[0]
        self.archiver.backoff_initial = 0.2
        self.archive = self.ctx.log_archive("binlog")
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.archiver.run(self.stop_event)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> "RunningArchiver":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(60)
        self.ctx.close()
        assert not self.thread.is_alive(), "archiver did not stop"
        assert self.error is None, f"archiver failed: {self.error}"

    def names(self) -> set[str]:
        return {obj.name for obj in self.archive.list()}

    def wait_archived(self, server: Mariadb, timeout: float = 30) -> str:
        """Rotate the server's binlog and wait until the closed file is archived complete."""
        file, _ = server.master_status()
        server.sql("FLUSH BINARY LOGS")
        name = f"{server.server_id}/{file}"
        wait_for(lambda: name in self.names(), timeout, f"{name} archived")
        return name


def backup(job: Job, *args: str) -> str:
    result = run_backupd("backup", job.name, *args, config=job.config)
    assert result.code == 0, result.err
    assert PASSWORD not in result.out + result.err
    return result.out.strip()


def restore(job: Job, to: Mariadb, *args: str) -> str:
    result = run_backupd("restore", job.name, "--to", to.url(), *args, config=job.config, timeout=300)
    assert result.code == 0, result.err
    assert PASSWORD not in result.out + result.err
    return result.out


def manifest(job: Job, backup_id: str) -> dict:
    return json.loads(run_backupd("show", backup_id, "--json", config=job.config, check=True).out)


def seed(server: Mariadb, db: str, rows: int = 1000) -> None:
    server.sql(f"CREATE DATABASE {db}", f"USE {db}",
               "CREATE TABLE items (id INT PRIMARY KEY, note VARCHAR(64), blob_col VARBINARY(16))",
               f"INSERT INTO items SELECT seq, md5(seq), unhex(md5(seq)) FROM seq_1_to_{rows}",
               "CREATE TABLE audit (id INT AUTO_INCREMENT PRIMARY KEY, item INT)",
               "CREATE TRIGGER items_audit AFTER INSERT ON items FOR EACH ROW INSERT INTO audit (item) VALUES (NEW.id)",
               "CREATE FUNCTION twice(x INT) RETURNS INT DETERMINISTIC RETURN x * 2")


# ---- logical backups ---------------------------------------------------------------------------


def test_logical_round_trip_records_coordinates_and_counts(source: Mariadb, target: Mariadb, tmp_path: Path,
                                                          keys: Keys) -> None:
    seed(source, "shop1", rows=3000)
    job = make_job(tmp_path, keys, source, ["shop1"])
    file, pos = source.master_status()
    backup_id = backup(job)
    shown = manifest(job, backup_id)
    assert shown["row_counts"] == {"shop1.audit": 0, "shop1.items": 3000}
    meta = shown["metadata"]
    assert meta["binlog"]["file"] == file and meta["binlog"]["position"] == pos
    assert meta["binlog"]["gtid"] == source.sql("SELECT @@gtid_binlog_pos")[0][0]
    assert meta["databases"] == ["shop1"] and meta["flavor"] == "mariadb"
    assert "pitr" not in meta  # archive_logs is off
    assert "mysqldump" in shown["tool_versions"]

    plan = run_backupd("restore", "shop", "--to", target.url(), "--dry-run", config=job.config, check=True).out
    assert backup_id in plan and "no binlog replay" in plan
    assert target.sql("SHOW DATABASES LIKE 'shop1'") == []

    out = restore(job, target)
    assert "dump loaded" in out
    assert target.count("shop1.items") == 3000
    assert target.sql("SELECT SUM(CRC32(note)), SUM(CRC32(blob_col)) FROM shop1.items") == \
        source.sql("SELECT SUM(CRC32(note)), SUM(CRC32(blob_col)) FROM shop1.items")
    assert target.sql("SELECT shop1.twice(21)")[0][0] == 42
    target.sql("INSERT INTO shop1.items VALUES (999999, 'x', NULL)")
    assert target.count("shop1.audit") == 1  # the trigger came along

    refused = run_backupd("restore", "shop", "--to", target.url(), config=job.config)
    assert refused.code == 1 and "already exist" in refused.err
    restore(job, target, "--clean")
    assert target.count("shop1.items") == 3000 and target.count("shop1.audit") == 0


def test_counts_are_exact_while_transactions_move_rows_during_the_dump(source: Mariadb, target: Mariadb,
                                                                      tmp_path: Path, keys: Keys) -> None:
    """Counts come from the dump stream; writers move rows between tables all through the dump."""
    total = 200_000
    source.sql("CREATE DATABASE moving", "USE moving",
               "CREATE TABLE a (id INT PRIMARY KEY, pad VARCHAR(64))",
               "CREATE TABLE b (id INT PRIMARY KEY, pad VARCHAR(64))",
               # values that look like row separators and statement ends, were the stream parsed naively
               f"INSERT INTO a SELECT seq, CONCAT('),(', seq, ');\n(', md5(seq)) FROM seq_1_to_{total}")
    job = make_job(tmp_path, keys, source, ["moving"])
    stop = threading.Event()
    moved: list[int] = []

    def mover() -> None:
        conn = source.connect("moving")
        conn.autocommit(False)
        try:
            with conn.cursor() as cur:
                next_id = 1
                while not stop.is_set() and next_id < total:
                    ids = list(range(next_id, next_id + 50))
                    marks = ",".join(map(str, ids))
                    cur.execute(f"INSERT INTO b SELECT id, pad FROM a WHERE id IN ({marks})")
                    cur.execute(f"DELETE FROM a WHERE id IN ({marks})")
                    conn.commit()
                    next_id += 50
                    moved.append(next_id)
        finally:
            conn.close()

    thread = threading.Thread(target=mover, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(moved) > 5, 30, "the mover to start")
        before = len(moved)
        backup_id = backup(job)
        during = len(moved) - before
    finally:
        stop.set()
        thread.join(30)
    shown = manifest(job, backup_id)
    counts = shown["row_counts"]
    assert shown["metadata"]["row_counts_note"] == "counted in the dump stream"
    assert set(counts) == {"moving.a", "moving.b"}
    assert counts["moving.a"] + counts["moving.b"] == total
    assert 0 < counts["moving.b"] < total
    assert during > 0, "no transaction committed while the backup ran"

    restore(job, target)
    assert {"moving.a": target.count("moving.a"), "moving.b": target.count("moving.b")} == counts
    verified = run_backupd("verify", "shop", config=job.config, timeout=300)
    assert verified.code == 0, verified.out + verified.err


def test_counts_fall_back_to_sql_when_rows_share_a_line(source: Mariadb, tmp_path: Path, keys: Keys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A dump with one INSERT per row (or MySQL's single-line extended INSERTs) is counted in SQL."""
    from drivers.mysql import logical

    seed(source, "shop6", rows=1200)
    job = make_job(tmp_path, keys, source, ["shop6"])
    plain_argv = logical.dump_argv

    def one_insert_per_row(*args: object) -> list[str]:
        argv = plain_argv(*args)  # type: ignore[arg-type]
        at = argv.index("--databases")
        return argv[:at] + ["--skip-extended-insert"] + argv[at:]

    monkeypatch.setattr(logical, "dump_argv", one_insert_per_row)
    ctx = job.context()
    seen: list[bytes] = []

    def sink(name: str, source_stream: object) -> object:
        size = 0
        while chunk := source_stream.read(1 << 16):  # type: ignore[attr-defined]
            size += len(chunk)
            if len(seen) < 200:
                seen.append(chunk)

        class Entry:
            raw_size = size
        return Entry()

    try:
        driver = ctx.driver
        with driver.credentials.defaults_file(driver.context.spool_dir) as defaults:
            result = logical.take_dump(driver.credentials, ["shop6"], [], sink, str(defaults), 120)
    finally:
        ctx.close()
    assert b"INSERT INTO `items` VALUES (1," in b"".join(seen)
    assert result["row_counts"] == {"shop6.audit": 0, "shop6.items": 1200}
    assert result["metadata"]["row_counts_note"].startswith("counted with SELECT COUNT(*) in the dump's snapshot")


def test_partial_restore_of_one_table(source: Mariadb, target: Mariadb, tmp_path: Path, keys: Keys) -> None:
    seed(source, "shop2", rows=500)
    source.sql("CREATE TABLE shop2.other (id INT PRIMARY KEY)", "INSERT INTO shop2.other VALUES (1), (2)")
    job = make_job(tmp_path, keys, source, ["shop2"])
    backup(job)
    restore(job, target, "--table", "shop2.other")
    assert target.sql("SHOW TABLES FROM shop2") == [("other",)]
    assert target.count("shop2.other") == 2
    bad = run_backupd("restore", "shop", "--to", target.url(), "--table", "shop2.nope", config=job.config)
    assert bad.code == 1 and error_lines(bad.err)[0] == "backupd: error: --table shop2.nope: the backup has no such table"


def test_wrong_password_is_one_clear_line(source: Mariadb, tmp_path: Path, keys: Keys) -> None:
    job = make_job(tmp_path, keys, source, ["mysql"], password="wrong-password-77")
    result = run_backupd("backup", "shop", config=job.config)
    assert result.code == 1
    lines = error_lines(result.err)
    assert lines[0].startswith(f"backupd: error: mysql://backup@127.0.0.1:{source.port}: cannot connect: ")
    assert "Access denied for user 'backup'" in lines[0]
    assert "wrong-password-77" not in result.err + result.out
    assert run_backupd("list", "--json", config=job.config, check=True).out.count("backup_id") == 0


def test_no_password_in_any_child_cmdline_or_environment(source: Mariadb, target: Mariadb, tmp_path: Path,
                                                        keys: Keys) -> None:
    source.sql("CREATE DATABASE shop3", "USE shop3", "CREATE TABLE shop3.big (id INT PRIMARY KEY, pad CHAR(200))",
               "INSERT INTO shop3.big SELECT seq, repeat('x', 200) FROM seq_1_to_300000")
    job = make_job(tmp_path, keys, source, ["shop3"])
    seen: dict[int, bytes] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(cmdlines())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        backup(job)
        restore(job, target)
    finally:
        done.set()
        watcher.join()
    ours = str(tmp_path).encode()  # our children name a defaults file under the job's state dir
    tools = {cmd.split(b"\0")[0].rsplit(b"/", 1)[-1] for cmd in seen.values() if ours in cmd.split(b"\n")[0]}
    assert {b"mariadb-dump", b"mariadb"} <= tools, f"the watcher never saw the dump and the client run: {tools}"
    leaks = [pid for pid, cmd in seen.items() if PASSWORD.encode() in cmd]
    assert leaks == []
    assert all(b"MYSQL_PWD" not in cmd for cmd in seen.values())
    assert target.count("shop3.big") == 300000


def test_check_reports_server_settings(source: Mariadb, tmp_path: Path, keys: Keys) -> None:
    job = make_job(tmp_path, keys, source, ["mysql"], archive_logs=True)
    result = run_backupd("check", "shop", config=job.config)
    assert result.code == 0, result.out + result.err
    out = result.out
    for line in ("jobs.shop: connection", "jobs.shop: privileges", "jobs.shop: log_bin: ON",
                 "jobs.shop: binlog_format: ROW", "jobs.shop: server_id: 11", "jobs.shop: tool mysqldump"):
        assert line in out, out
    (tmp_path / "bad").mkdir()
    bad = make_job(tmp_path / "bad", keys, source, ["mysql"], password="nope")
    failed = run_backupd("check", "shop", config=bad.config)
    assert failed.code == 1 and "FAIL  jobs.shop: connection" in failed.out


# ---- physical backups and verification ------------------------------------------------------------


def test_physical_round_trip_with_equal_row_counts(source: Mariadb, tmp_path: Path, keys: Keys, reachable: Path) -> None:
    seed(source, "shop4", rows=20000)
    expected = {f"shop4.{t}": source.count(f"shop4.{t}") for t in ("items", "audit")}
    job = make_job(tmp_path, keys, source, ["shop4"], method="physical")
    backup_id = backup(job)
    shown = manifest(job, backup_id)
    assert shown["method"] == "physical"
    assert {k: v for k, v in shown["row_counts"].items() if k.startswith("shop4.")} == expected
    assert shown["metadata"]["binlog"]["file"].startswith("mysql-bin.")

    dest = reachable / "datadir"
    out = run_backupd("restore", "shop", "--to", str(dest), config=job.config, timeout=300)
    assert out.code == 0, out.err
    assert "prepared" in out.out and (dest / "ibdata1").is_file()
    info = (dest / "xtrabackup_binlog_info").read_text().split()
    assert info[0] == shown["metadata"]["binlog"]["file"]
    assert datadir_counts(dest, reachable / "run", list(expected)) == expected

    refused = run_backupd("restore", "shop", "--to", str(dest), config=job.config)
    assert refused.code == 1 and "not an empty directory" in refused.err

    verified = run_backupd("verify", "shop", config=job.config, timeout=300)
    assert verified.code == 0, verified.out + verified.err


def trx_counter(server: Mariadb) -> int:
    from drivers.mysql.physical import TRX_COUNTER_RE

    return int(TRX_COUNTER_RE.search(server.sql("SHOW ENGINE INNODB STATUS")[0][2])[1])


def quiet(server: Mariadb) -> None:
    """Wait until no transaction has run for a second (background statistics updates are transactions too)."""
    def still() -> bool:
        before = trx_counter(server)
        time.sleep(1)
        return trx_counter(server) == before
    wait_for(still, 60, "a quiet server")


def copy_counts(job: Job, tables: list[str]) -> dict[str, int]:
    """Row counts of the newest physical backup, restored and prepared, in a scratch server."""
    with open_dir() as reachable:
        dest = reachable / "copy"
        restored = run_backupd("restore", "shop", "--to", str(dest), config=job.config, timeout=300)
        assert restored.code == 0, restored.err
        return datadir_counts(dest, reachable / "copy-run", tables)


def datadir_counts(datadir: Path, run_dir: Path, tables: list[str]) -> dict[str, int]:
    """Row counts of a restored data directory, read by a scratch server started on it."""
    with scratch_server(datadir, run_dir) as server:
        conn = server.credentials.connect()
        try:
            with conn.cursor() as cur:
                found = {}
                for table in tables:
                    cur.execute(f"SELECT COUNT(*) FROM {table}")
                    found[table] = cur.fetchone()[0]
        finally:
            conn.close()
    return found


def test_physical_counts_taken_during_the_copy_on_a_quiet_server(source: Mariadb, tmp_path: Path,
                                                                 keys: Keys) -> None:
    source.sql("CREATE DATABASE quiet1", "CREATE TABLE quiet1.t (id INT PRIMARY KEY, v INT)")
    source.sql("INSERT INTO t SELECT seq, seq FROM seq_1_to_5000", database="quiet1")
    job = make_job(tmp_path, keys, source, ["quiet1"], method="physical")
    quiet(source)
    shown = manifest(job, backup(job))
    assert shown["metadata"]["row_counts_note"].startswith("counted during the copy; no transaction committed")
    assert shown["row_counts"] == {"quiet1.t": 5000} == copy_counts(job, ["quiet1.t"])


def test_physical_counts_under_writes_come_from_the_copys_own_point(source: Mariadb, tmp_path: Path,
                                                                    keys: Keys) -> None:
    source.sql("CREATE DATABASE busy1", "CREATE TABLE busy1.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT)")
    source.sql("INSERT INTO t (v) SELECT seq FROM seq_1_to_5000", database="busy1")
    job = make_job(tmp_path, keys, source, ["busy1"], method="physical")
    with writing(source, "busy1.t"):
        shown = manifest(job, backup(job))
    note = shown["metadata"]["row_counts_note"]
    assert not note.startswith("counted during the copy"), note
    if shown["row_counts"]:  # else: commits slipped in as the copy ended, and the manifest says so
        assert note == "counted in a snapshot at the copy's binlog position"
        assert shown["row_counts"] == copy_counts(job, ["busy1.t"])


def test_a_copy_records_the_mariadb_backup_version_its_own_log_names() -> None:
    """The version line heads every copy's log, so no second ``--version`` run is needed (it prints to stderr)."""
    from drivers.mysql.physical import copy_version

    tool = require_tool("mariadb-backup")
    line = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stderr.strip()
    assert " based on MariaDB server " in line
    log = (f"[00] 2026-01-01 00:00:00 Connecting to MariaDB server host: localhost\n{line}\n"
           "[00] 2026-01-01 00:00:00 Streaming ./shop/items.ibd\n").encode()
    assert copy_version(log) == line


def test_verify_loads_into_a_scratch_server_and_catches_wrong_counts(source: Mariadb, tmp_path: Path,
                                                                    keys: Keys) -> None:
    seed(source, "shop5", rows=700)
    job = make_job(tmp_path, keys, source, ["shop5"], verify={"checks": ["SELECT COUNT(*) = 700 FROM items"]})
    backup_id = backup(job)
    good = run_backupd("verify", "shop", config=job.config, timeout=300)
    assert good.code == 0, good.out + good.err
    reports = list((job.repo / "shop" / "verify").glob("*.json"))
    assert len(reports) == 1
    report = stored_report(reports[0], keys.identity_file)
    assert report["result"] == "passed" and report["counts_found"] == {"shop5.audit": 0, "shop5.items": 700}
    assert report["checks"][0]["ok"] is True

    path = job.repo / "shop" / "backups" / backup_id / "manifest.json"
    data = json.loads(path.read_text())
    data["row_counts"]["shop5.items"] = 701
    path.write_text(json.dumps(data))
    bad = run_backupd("verify", "shop", config=job.config, timeout=300)
    assert bad.code == 3
    assert "table shop5.items: 700 rows restored, the manifest says 701" in bad.out + bad.err
