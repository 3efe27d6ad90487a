"""Loading a dump through parallel clients with deferred indexes restores exactly what was dumped."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from core_fixtures import Keys
from drivers.mysql.client import Credentials
from drivers.mysql.loader import ParallelLoad, defer_keys
from drivers.mysql.options import Endpoint
from mysql_support import Mariadb, started, wait_for
from support import run_backupd
from test_mysql_driver import backup, make_job, manifest, restore, tools  # noqa: F401

pytestmark = pytest.mark.usefixtures("tools")

ROWS = 40_000  # ~3 MB per table: several INSERT statements, so the data clients take part

SCHEMA = [
    "CREATE DATABASE rich", "USE rich",
    # plain keys (deferred), a unique and a prefix key that stay or go by the rules
    "CREATE TABLE plain (id INT PRIMARY KEY, a INT, b VARCHAR(64), c INT, UNIQUE KEY uc (c), KEY ka (a), "
    "KEY kb (b(10), a) COMMENT 'prefix; with a, comma', KEY `k``q` (a, c))",
    # AUTO_INCREMENT only indexed by a plain key: that key must stay in CREATE TABLE
    "CREATE TABLE autoinc (id INT AUTO_INCREMENT, v INT, KEY kid (id), KEY kv (v)) AUTO_INCREMENT=5",
    "CREATE TABLE ft (id INT PRIMARY KEY, body TEXT, FULLTEXT KEY fb (body), KEY kid (id, body(5)))",
    "CREATE TABLE parted (id INT, v INT, PRIMARY KEY (id), KEY kv (v)) "
    "PARTITION BY RANGE (id) (PARTITION p0 VALUES LESS THAN (20000), PARTITION p1 VALUES LESS THAN MAXVALUE)",
    "CREATE TABLE mine (id INT PRIMARY KEY, v INT, KEY kv (v)) ENGINE=MyISAM",
    "CREATE TABLE versioned (id INT PRIMARY KEY, v INT, KEY kv (v)) WITH SYSTEM VERSIONING",
    "CREATE TABLE parent (id INT PRIMARY KEY, v INT, KEY kv (v))",
    "CREATE TABLE child (id INT PRIMARY KEY, p INT, w INT, KEY kw (w), FOREIGN KEY (p) REFERENCES parent (id))",
    "CREATE TABLE later (id INT PRIMARY KEY, v INT, KEY kv (v))",
    "CREATE TABLE audit (id INT AUTO_INCREMENT PRIMARY KEY, item INT)",
    "CREATE TABLE empty (id INT PRIMARY KEY, v INT, KEY kv (v))",
    "CREATE SEQUENCE seq START WITH 100",
    "CREATE VIEW big AS SELECT a, COUNT(*) AS n FROM plain GROUP BY a",
    "CREATE FUNCTION twice(x INT) RETURNS INT DETERMINISTIC RETURN x * 2",
]
FILL = [
    f"INSERT INTO plain SELECT seq, seq % 97, CONCAT('),(', md5(seq), ');\\n(x'), seq FROM seq_1_to_{ROWS}",
    f"INSERT INTO autoinc (v) SELECT seq % 13 FROM seq_1_to_{ROWS}",
    f"INSERT INTO ft SELECT seq, CONCAT('word', seq % 50, ' ', md5(seq)) FROM seq_1_to_{ROWS}",
    f"INSERT INTO parted SELECT seq, seq % 7 FROM seq_1_to_{ROWS}",
    f"INSERT INTO mine SELECT seq, seq % 5 FROM seq_1_to_{ROWS}",
    f"INSERT INTO versioned SELECT seq, seq FROM seq_1_to_{ROWS}",
    "UPDATE versioned SET v = v + 1 WHERE id <= 10",
    f"INSERT INTO parent SELECT seq, seq FROM seq_1_to_{ROWS}",
    f"INSERT INTO child SELECT seq, seq, seq % 3 FROM seq_1_to_{ROWS}",
    f"INSERT INTO later SELECT seq, -seq FROM seq_1_to_{ROWS}",
    # a trigger that would double the audit rows if it fired while the data loads
    "CREATE TRIGGER plain_ai AFTER INSERT ON plain FOR EACH ROW INSERT INTO audit (item) VALUES (NEW.id)",
    "INSERT INTO plain VALUES (-1, 1, 'by trigger', -1)",
]
TABLES = ["plain", "autoinc", "ft", "parted", "mine", "versioned", "parent", "child", "later", "audit", "empty"]


@pytest.fixture(scope="module")
def source() -> Iterator[Mariadb]:
    server = started(log_bin=True, server_id=31)
    try:
        server.sql(*SCHEMA)
        server.sql(*FILL, database="rich")
        yield server
    finally:
        server.destroy()


@pytest.fixture
def target() -> Iterator[Mariadb]:
    server = started(log_bin=False, server_id=32)
    try:
        yield server
    finally:
        server.destroy()


def as_root(server: Mariadb) -> Credentials:
    return Credentials(Endpoint(host="127.0.0.1", port=server.port, user="root"), None)


def shape(server: Mariadb) -> dict[str, object]:
    """Everything a restore must reproduce: definitions, row checksums, counts, objects."""
    found: dict[str, object] = {}
    for table in TABLES:
        found[f"create {table}"] = server.sql(f"SHOW CREATE TABLE rich.{table}")[0][1]
        found[f"count {table}"] = server.count(f"rich.{table}")
        if table == "versioned":  # its row_start/row_end are the load's time, not the source's
            found[f"checksum {table}"] = server.sql("SELECT SUM(CRC32(CONCAT(id, '/', v))) FROM rich.versioned")
        else:
            found[f"checksum {table}"] = server.sql(f"CHECKSUM TABLE rich.{table} EXTENDED")[0][1]
    found["triggers"] = server.sql("SELECT trigger_name FROM information_schema.triggers WHERE trigger_schema='rich'")
    found["view"] = server.sql("SELECT * FROM rich.big ORDER BY a LIMIT 3")
    found["function"] = server.sql("SELECT rich.twice(21)")
    found["sequence"] = server.sql("SELECT NEXTVAL(rich.seq)")
    found["keys"] = server.sql("SELECT table_name, index_name, seq_in_index, column_name, sub_part FROM "
                               "information_schema.statistics WHERE table_schema='rich' ORDER BY 1, 2, 3")
    return found


def test_restore_through_parallel_clients_is_exact(source: Mariadb, target: Mariadb, tmp_path: Path,
                                                   keys: Keys) -> None:
    job = make_job(tmp_path, keys, source, ["rich"])
    backup_id = backup(job)
    expected = shape(source)
    out = restore(job, target)
    assert "dump loaded" in out
    assert shape(target) == expected
    assert manifest(job, backup_id)["row_counts"]["rich.plain"] == ROWS + 1

    verified = run_backupd("verify", "shop", config=job.config, timeout=300)
    assert verified.code == 0, verified.out + verified.err


class MainRecorder:
    """Stands in for the main mariadb client: records what it is sent and the barriers."""

    def __init__(self, argv: object, marker: bytes) -> None:
        self.data = bytearray()

    def send(self, data: bytes) -> None:
        self.data += data

    def sync(self, n: int) -> None:
        self.data += b"<SYNC>"

    def finish(self) -> None:
        pass


class DataRecorder:
    """Stands in for a data client: records the header it replays, each whole statement put, the barriers."""

    def __init__(self, credentials: object, preamble: list[bytes], number: int) -> None:
        self.database: bytes | None = None
        self.data = bytearray(b"".join(preamble) + b"<PREAMBLE>")

    def put(self, statement: bytes) -> None:
        self.data += statement + b"<PUT>"

    def sync(self) -> None:
        self.data += b"<SYNC>"


def routed(dump: bytes, workers: int, cut: int, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    import drivers.mysql.loader as loader

    monkeypatch.setattr(loader, "_MainClient", MainRecorder)
    monkeypatch.setattr(loader, "DataClient", DataRecorder)
    load = ParallelLoad(["mariadb"], Credentials(Endpoint(), None), workers)
    for start in range(0, len(dump), cut):
        load.feed(dump[start:start + cut])
    load._flush_held()
    load._end_data()
    load._alters()
    return [bytes(client.data) for client in [load.main, *load._workers]]  # type: ignore[attr-defined]


DUMP = b"""/*M!999999\\- enable the sandbox mode */ 
-- MariaDB dump 10.19  Distrib 10.11.19-MariaDB
/*!40101 SET NAMES utf8mb4 */;
/*!40014 SET @OLD_UNIQUE_CHECKS=@@UNIQUE_CHECKS, UNIQUE_CHECKS=0 */;
--
-- Current Database: `d`
--
USE `d`;
--
-- Table structure for table `t`
--
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `t` (
  `id` int(11) NOT NULL,
  `v` int(11) DEFAULT NULL,
  PRIMARY KEY (`id`),
  KEY `kv` (`v`)
) ENGINE=InnoDB;
--
-- Dumping data for table `t`
--
LOCK TABLES `t` WRITE;
/*!40000 ALTER TABLE `t` DISABLE KEYS */;
INSERT INTO `t` VALUES
(1,'a;'),
(2,');\\n(');
INSERT INTO `t` VALUES
(3,NULL);
INSERT INTO `t` VALUES
(4,4);
/*!40000 ALTER TABLE `t` ENABLE KEYS */;
UNLOCK TABLES;
DELIMITER ;;
/*!50003 CREATE*/ /*!50003 TRIGGER tr AFTER INSERT ON `t` FOR EACH ROW
INSERT INTO `t` VALUES
(NEW.id) */;;
DELIMITER ;
--
-- Table structure for table `small`
--
CREATE TABLE `small` (
  `id` int(11) NOT NULL
) ENGINE=InnoDB;
--
-- Dumping data for table `small`
--
LOCK TABLES `small` WRITE;
INSERT INTO `small` VALUES
(9);
UNLOCK TABLES;
-- Dump completed
"""


@pytest.mark.parametrize("cut", [1, 7, 64, 1 << 20])
def test_statements_barriers_and_deferred_keys_in_order(cut: int, monkeypatch: pytest.MonkeyPatch) -> None:
    main, first, second = routed(DUMP, 2, cut, monkeypatch)
    # the data clients get the header's statements (not the sandbox-mode line), USE, and whole statements
    # alternately
    header = (b"/*!40101 SET NAMES utf8mb4 */;\n/*!40014 SET @OLD_UNIQUE_CHECKS=@@UNIQUE_CHECKS, UNIQUE_CHECKS=0 */;\n"
              b"<PREAMBLE>")
    assert first.startswith(header) and second.startswith(header)
    assert first.count(b"INSERT INTO `t` VALUES") == 2 and second.count(b"INSERT INTO `t` VALUES") == 1
    assert first == header + (b"USE `d`<PUT>INSERT INTO `t` VALUES\n(1,'a;'),\n(2,');\\n(');\n<PUT>"
                              b"INSERT INTO `t` VALUES\n(4,4);\n<PUT><SYNC>")
    assert second == header + b"USE `d`<PUT>INSERT INTO `t` VALUES\n(3,NULL);\n<PUT><SYNC>"
    # the main client: CREATE without the key, a barrier before the data, the rest after it
    assert b"  PRIMARY KEY (`id`)\n) ENGINE=InnoDB;" in main and b"KEY `kv`" not in main.split(b"ALTER TABLE")[0]
    order = [main.index(marker) for marker in (b"CREATE TABLE `t`", b"DISABLE KEYS", b"<SYNC>", b"ENABLE KEYS",
                                               b"TRIGGER tr", b"ALTER TABLE `d`.`t` ADD KEY `kv` (`v`);",
                                               b"CREATE TABLE `small`", b"(9);")]
    assert order == sorted(order)
    assert b"LOCK TABLES" not in main and b"INSERT INTO `t` VALUES\n(1" not in main
    assert main.count(b"<SYNC>") == 1  # the one-statement table needed no barrier


def test_which_keys_are_deferred() -> None:
    def lines(body: str, tail: str = ") ENGINE=InnoDB;") -> list[bytes]:
        return [f"{line}\n".encode() for line in ["CREATE TABLE `t` (", *body.splitlines(), tail]]

    keep, keys = defer_keys(lines("  `id` int(11) NOT NULL AUTO_INCREMENT,\n  `v` int(11),\n  KEY `ki` (`id`),\n"
                                  "  UNIQUE KEY `u` (`v`),\n  KEY `kv` (`v`)"))
    assert keys == [b"KEY `kv` (`v`)"]
    assert keep[-3:] == [b"  KEY `ki` (`id`),\n", b"  UNIQUE KEY `u` (`v`)\n", b") ENGINE=InnoDB;\n"]
    assert defer_keys(lines("  `v` int(11),\n  KEY `kv` (`v`)", ") ENGINE=MyISAM;"))[1] == []
    assert defer_keys(lines("  `v` int(11),\n  KEY `kv` (`v`)", ") ENGINE=InnoDB WITH SYSTEM VERSIONING;"))[1] == []
    assert defer_keys(lines("  `v` int(11),\n  KEY `kv` (`v`),\n  CONSTRAINT `f` FOREIGN KEY (`v`) REFERENCES `p` "
                            "(`id`)"))[1] == []
    assert defer_keys(lines("  `v` int(11),\n  KEY `kv` (`v`)"), allowed=False)[1] == []
    assert defer_keys(lines("  `v` int(11),\n  KEY `kv` (`v`)"))[1] == [b"KEY `kv` (`v`)"]
    assert defer_keys(lines("  `v` int(11),\n  FULLTEXT KEY `f` (`v`)"))[1] == []


def test_data_clients_and_deferred_indexes_are_used(source: Mariadb, target: Mariadb, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import subprocess

    import drivers.mysql.loader as loader
    from drivers.mysql import load

    dump = subprocess.run(["mariadb-dump", "--no-defaults", "-h127.0.0.1", f"-P{source.port}", "-uroot",
                           "--single-transaction", "--routines", "--triggers", "--hex-blob", "--databases", "rich"],
                          check=True, capture_output=True).stdout
    made: list[ParallelLoad] = []
    sent: list[bytes] = []

    class Spy(ParallelLoad):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)  # type: ignore[arg-type]
            made.append(self)

    original_send = loader._MainClient.send
    monkeypatch.setattr(loader, "ParallelLoad", Spy)
    monkeypatch.setattr(loader._MainClient, "send", lambda self, data: (sent.append(data), original_send(self, data)))
    defaults = tmp_path / "target.cnf"
    defaults.write_text(f"[client]\nuser=root\nhost=127.0.0.1\nport={target.port}\nprotocol=TCP\n")
    load.load_dump(as_root(target), str(defaults), io.BytesIO(dump), set(), workers=2)
    assert len(made) == 1 and len(made[0]._workers) == 2
    alters = [data for data in sent if b"ALTER TABLE `rich`." in data]
    deferred = {line.split(b"`")[3] for data in alters for line in data.splitlines() if line.startswith(b"ALTER")}
    # not: child (foreign key), parent (child, dumped before it, references it), mine (MyISAM), versioned
    assert deferred == {b"autoinc", b"empty", b"ft", b"later", b"parted", b"plain"}
    found, expected = shape(target), shape(source)
    found.pop("sequence"), expected.pop("sequence")  # NEXTVAL in the first test moved it past its cache
    assert found == expected


def a_dump(database: str, create: str, statements: list[str], header: str = "") -> bytes:
    """A dump of one table in ``database``, as mariadb-dump lays it out."""
    return (f"{header}--\n-- Current Database: `{database}`\n--\nCREATE DATABASE IF NOT EXISTS `{database}`;\n"
            f"USE `{database}`;\n--\n-- Table structure for table `t`\n--\n{create}\n"
            "--\n-- Dumping data for table `t`\n--\n" + "".join(statements) + "-- Dump completed\n").encode()


def values(first: int, last: int) -> str:
    rows = ",\n".join(f"({i},{i * 7})" for i in range(first, last + 1))
    return f"INSERT INTO `t` VALUES\n{rows};\n"


T_CREATE = "CREATE TABLE IF NOT EXISTS `t` (\n  `id` int NOT NULL,\n  `v` int,\n  PRIMARY KEY (`id`)\n) ENGINE=InnoDB;"


def defaults_for(server: Mariadb, tmp_path: Path) -> str:
    defaults = tmp_path / "target.cnf"
    defaults.write_text(f"[client]\nuser=root\nhost=127.0.0.1\nport={server.port}\nprotocol=TCP\n")
    return str(defaults)


def lock_waits(server: Mariadb) -> int:
    # InnoDB refreshes information_schema.innodb_trx only when it was not read for 0.1 s: polled faster, it stays stale
    time.sleep(0.15)
    return int(server.sql("SELECT COUNT(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'")[0][0])


def loader_leftovers(server: Mariadb) -> tuple[list[str], list[object]]:
    """Threads of the loader still running here, and connections of anyone but this check on the server."""
    import threading

    threads = [t.name for t in threading.enumerate() if t.name.startswith("mysql-load-")]
    others = server.sql("SELECT id, command, info FROM information_schema.processlist "
                        "WHERE id <> CONNECTION_ID() AND command NOT IN ('Daemon', 'Binlog Dump')")
    return threads, list(others)


def test_a_deadlock_victim_statement_runs_again_and_the_rows_are_exact(target: Mariadb, tmp_path: Path) -> None:
    """A real InnoDB deadlock between a test-held transaction and a data client: the client is the victim."""
    import io
    import threading

    from drivers.mysql import load

    target.sql("CREATE DATABASE dl", "USE dl", "CREATE TABLE t (id INT NOT NULL, v INT, PRIMARY KEY (id)) ENGINE=InnoDB",
               "CREATE TABLE expected LIKE t", "INSERT INTO expected SELECT seq, seq * 7 FROM seq_1_to_4000",
               "CREATE TABLE weight (id INT PRIMARY KEY) ENGINE=InnoDB")
    deadlocks = int(target.sql("SHOW GLOBAL STATUS LIKE 'Innodb_deadlocks'")[0][1])
    holder = target.connect("dl")
    holder.autocommit(False)
    with holder.cursor() as cursor:
        # heavier than the load's statement, so InnoDB picks the data client as the deadlock victim
        cursor.execute("INSERT INTO dl.weight SELECT seq FROM seq_1_to_50000")
        cursor.execute("INSERT INTO dl.t VALUES (1000, -1)")  # the first statement waits here
    dump = a_dump("dl", T_CREATE, [values(1, 2000), values(2001, 4000)])
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(load.load_dump(as_root(target), defaults_for(target, tmp_path), io.BytesIO(dump), set(),
                                          workers=2))
        except Exception as exc:  # noqa: BLE001 - asserted below
            outcome.append(exc)

    loading = threading.Thread(target=run)
    loading.start()
    try:
        wait_for(lambda: lock_waits(target) == 1, what="the data client waiting on the held row")
        with holder.cursor() as cursor:
            cursor.execute("INSERT INTO dl.t VALUES (10, -1)")  # the data client holds 10: a deadlock
        assert int(target.sql("SHOW GLOBAL STATUS LIKE 'Innodb_deadlocks'")[0][1]) == deadlocks + 1
        # the data client's statement runs again and waits on the held rows until they go
        wait_for(lambda: lock_waits(target) == 1, what="the statement run again")
    finally:
        holder.rollback()
        holder.close()
        loading.join(timeout=60)
    assert isinstance(outcome[0], int), outcome
    assert target.count("dl.t") == 4000
    assert target.sql("CHECKSUM TABLE dl.t EXTENDED")[0][1] == target.sql("CHECKSUM TABLE dl.expected EXTENDED")[0][1]
    assert loader_leftovers(target) == ([], [])


def test_retries_exhausted_fail_the_load_naming_the_error_only(target: Mariadb, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from drivers.mysql import dataclient, load
    from drivers.mysql.client import ContentRejected

    monkeypatch.setattr(dataclient, "ATTEMPTS", 3)
    target.sql("SET GLOBAL innodb_lock_wait_timeout = 1", "CREATE DATABASE lw",
               "CREATE TABLE lw.t (id INT NOT NULL, v INT, PRIMARY KEY (id)) ENGINE=InnoDB")
    holder = target.connect()
    holder.autocommit(False)
    try:
        with holder.cursor() as cursor:
            cursor.execute("INSERT INTO lw.t VALUES (1000, -1)")
        dump = a_dump("lw", T_CREATE, [values(1, 2000), values(2001, 4000)])
        with pytest.raises(ContentRejected) as caught:
            load.load_dump(as_root(target), defaults_for(target, tmp_path), io.BytesIO(dump), set(), workers=2)
    finally:
        holder.rollback()
        holder.close()
    message = str(caught.value)
    assert message == (f"mysql://root@127.0.0.1:{target.port}: data connection 1 (loading the dump) failed: "
                       "ERROR 1205 (LOCK_WAIT_TIMEOUT), still after 3 attempts")
    assert caught.value.brief == message.split(": ", 1)[1]
    assert loader_leftovers(target) == ([], [])


def test_an_error_in_a_data_client_fails_the_load_naming_it(target: Mariadb, tmp_path: Path) -> None:
    import io

    from drivers.mysql import load
    from drivers.mysql.client import ContentRejected

    dump = a_dump("bad", T_CREATE.replace(" IF NOT EXISTS", ""), [values(1, 30_000)] * 3)
    with pytest.raises(ContentRejected, match=r"^mysql://root@127\.0\.0\.1:\d+: data connection \d \(loading the dump\) "
                                              r"failed: ERROR 1062 \(DUP_ENTRY\)$") as caught:
        load.load_dump(as_root(target), defaults_for(target, tmp_path), io.BytesIO(dump), set(), workers=2)
    assert "Duplicate" not in str(caught.value)
    assert loader_leftovers(target) == ([], [])


def test_a_restore_whose_data_client_fails_exits_1_naming_the_error_only(source: Mariadb, target: Mariadb,
                                                                        tmp_path: Path, keys: Keys) -> None:
    """Through the command: restore exits 1, verify 3, each with one line naming the server's error number."""
    from mysql_support import forge_stream
    from support import error_lines

    job = make_job(tmp_path, keys, source, ["rich"])
    backup_id = backup(job)
    dump = a_dump("bad", T_CREATE.replace(" IF NOT EXISTS", ""), [values(1, 30_000)] * 3)
    forge_stream(job.repo, "shop", backup_id, "dump", dump, keys.identity.to_recipient())

    restored = run_backupd("restore", "shop", "--to", target.url(), config=job.config, timeout=300)
    assert restored.code == 1, restored.out + restored.err
    lines = error_lines(restored.err)
    assert len(lines) == 1 and "data connection" in lines[0] and "ERROR 1062 (DUP_ENTRY)" in lines[0], lines
    assert "Duplicate" not in restored.err and "(30000," not in restored.err

    verified = run_backupd("verify", "shop", config=job.config, timeout=300)
    assert verified.code == 3, verified.out + verified.err
    assert "ERROR 1062 (DUP_ENTRY)" in verified.out + verified.err and "Duplicate" not in verified.out + verified.err


def test_the_dump_header_is_in_effect_in_the_data_connections(target: Mariadb, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Each data connection runs the header's settings, whatever the server's defaults, and skips its non-statements."""
    import io

    import drivers.mysql.loader as loader
    from drivers.mysql import load

    made: list[ParallelLoad] = []

    class Spy(ParallelLoad):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(loader, "ParallelLoad", Spy)
    target.sql("SET GLOBAL time_zone = '+05:00'", "SET GLOBAL sql_mode = 'STRICT_ALL_TABLES'")
    header = ("/*M!999999\\- enable the sandbox mode */ \n"
              "/*!40101 SET @OLD_CHARACTER_SET_CLIENT=@@CHARACTER_SET_CLIENT */;\n"
              "/*!40101 SET NAMES latin1 */;\n"
              "/*!40103 SET TIME_ZONE='+00:00' */;\n"
              "/*!40014 SET @OLD_UNIQUE_CHECKS=@@UNIQUE_CHECKS, UNIQUE_CHECKS=0 */;\n"
              "/*!40014 SET @OLD_FOREIGN_KEY_CHECKS=@@FOREIGN_KEY_CHECKS, FOREIGN_KEY_CHECKS=0 */;\n"
              "/*!40101 SET @OLD_SQL_MODE=@@SQL_MODE, SQL_MODE='NO_AUTO_VALUE_ON_ZERO' */;\n\n")
    create = ("CREATE TABLE `t` (\n  `id` int NOT NULL,\n  `uc` int,\n  `fk` int,\n  `mode` varchar(100),\n"
              "  `tz` varchar(10),\n  `cs` varchar(20),\n  `e` varchar(5) CHARACTER SET utf8mb4,\n"
              "  `at` timestamp NULL,\n  PRIMARY KEY (`id`)\n) ENGINE=InnoDB;")
    row = ("INSERT INTO `t` VALUES\n({n},@@unique_checks,@@foreign_key_checks,@@sql_mode,@@time_zone,"
           "@@character_set_client,'caf\xe9','2020-01-01 00:00:00');\n")
    dump = a_dump("hdr", create, [row.format(n=n) for n in (1, 2, 3)], header=header)
    load.load_dump(as_root(target), defaults_for(target, tmp_path), io.BytesIO(dump.decode().encode("latin1")), set(),
                   workers=2)
    assert len(made) == 1 and len(made[0]._workers) == 2  # the rows went through both data connections
    expected = (0, 0, "NO_AUTO_VALUE_ON_ZERO", "+00:00", "latin1", "caf\u00e9", 1577836800)
    assert target.sql("SELECT id, uc, fk, mode, tz, cs, e, UNIX_TIMESTAMP(at) FROM hdr.t ORDER BY id") == [
        (n, *expected) for n in (1, 2, 3)]


@pytest.mark.parametrize("engine, extra", [("MyISAM", ""), ("InnoDB", ",\n  FULLTEXT KEY `f` (`v`)")])
def test_tables_that_gain_nothing_from_parallel_inserts_load_on_the_main_client(
        engine: str, extra: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dump = DUMP.replace(b"  KEY `kv` (`v`)\n) ENGINE=InnoDB;", f"  KEY `kv` (`v`){extra}\n) ENGINE={engine};".encode())
    main, *workers = routed(dump, 2, 64, monkeypatch)
    assert workers == []
    assert main.count(b"INSERT INTO `t` VALUES") == 3 + 1 and b"<SYNC>" not in main  # + the trigger's
