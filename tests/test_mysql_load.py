"""Loading a dump through parallel clients with deferred indexes restores exactly what was dumped."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from core_fixtures import Keys
from drivers.mysql.loader import ParallelLoad, defer_keys
from mysql_support import Mariadb, started
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


class Recorder:
    """Stands in for a mariadb client: records what it is sent and the barriers."""

    def __init__(self, argv: object, marker: bytes) -> None:
        self.database: bytes | None = None
        self.data = bytearray()

    def send(self, data: bytes) -> None:
        self.data += data

    def sync(self, n: int) -> None:
        self.data += b"<SYNC>"

    def finish(self) -> None:
        pass


def routed(dump: bytes, workers: int, cut: int, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    import drivers.mysql.loader as loader

    monkeypatch.setattr(loader, "_Client", Recorder)
    load = ParallelLoad(["mariadb"], workers)
    for start in range(0, len(dump), cut):
        load.feed(dump[start:start + cut])
    load._flush_held()
    load._end_data()
    load._alters()
    return [bytes(client.data) for client in [load.main, *load._workers]]  # type: ignore[attr-defined]


DUMP = b"""/*!40101 SET NAMES utf8mb4 */;
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
    # the data clients get the header, USE, and whole statements alternately
    assert first.startswith(b"/*!40101 SET NAMES utf8mb4 */;\n/*!40014 SET @OLD_UNIQUE_CHECKS")
    assert first.count(b"INSERT INTO `t` VALUES") == 2 and second.count(b"INSERT INTO `t` VALUES") == 1
    assert b"(1,'a;'),\n(2,');\\n(');\n" in first and b"USE `d`;\n" in first and first.endswith(b"<SYNC>")
    assert b"(3,NULL);\n" in second and second.endswith(b"<SYNC>")
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

    original_send = loader._Client.send
    monkeypatch.setattr(loader, "ParallelLoad", Spy)
    monkeypatch.setattr(loader._Client, "send", lambda self, data: (sent.append(data), original_send(self, data)))
    defaults = tmp_path / "target.cnf"
    defaults.write_text(f"[client]\nuser=root\nhost=127.0.0.1\nport={target.port}\nprotocol=TCP\n")
    load.load_dump(str(defaults), io.BytesIO(dump), set(), workers=2)
    assert len(made) == 1 and len(made[0]._workers) == 2
    alters = [data for data in sent if b"ALTER TABLE `rich`." in data]
    deferred = {line.split(b"`")[3] for data in alters for line in data.splitlines() if line.startswith(b"ALTER")}
    # not: child (foreign key), parent (child, dumped before it, references it), mine (MyISAM), versioned
    assert deferred == {b"autoinc", b"empty", b"ft", b"later", b"parted", b"plain"}
    found, expected = shape(target), shape(source)
    found.pop("sequence"), expected.pop("sequence")  # NEXTVAL in the first test moved it past its cache
    assert found == expected


def test_an_error_in_a_data_client_fails_the_load_naming_it(target: Mariadb, tmp_path: Path) -> None:
    import io

    from backupd.errors import DriverError
    from drivers.mysql import load

    rows = ",\n".join(f"({i},{i})" for i in range(1, 30_000))
    statement = f"INSERT INTO `t` VALUES\n{rows};\n"
    dump = ("--\n-- Current Database: `bad`\n--\nCREATE DATABASE `bad`;\nUSE `bad`;\n"
            "--\n-- Table structure for table `t`\n--\nCREATE TABLE `t` (\n  `id` int NOT NULL,\n  `v` int,\n"
            "  PRIMARY KEY (`id`)\n) ENGINE=InnoDB;\n--\n-- Dumping data for table `t`\n--\n"
            + statement * 3 + "-- Dump completed\n").encode()
    defaults = tmp_path / "target.cnf"
    defaults.write_text(f"[client]\nuser=root\nhost=127.0.0.1\nport={target.port}\nprotocol=TCP\n")
    with pytest.raises(DriverError, match=r"mariadb \(loading the dump\) exited with status 1: .*Duplicate entry '1' for key"):
        load.load_dump(str(defaults), io.BytesIO(dump), set(), workers=2)


@pytest.mark.parametrize("engine, extra", [("MyISAM", ""), ("InnoDB", ",\n  FULLTEXT KEY `f` (`v`)")])
def test_tables_that_gain_nothing_from_parallel_inserts_load_on_the_main_client(
        engine: str, extra: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dump = DUMP.replace(b"  KEY `kv` (`v`)\n) ENGINE=InnoDB;", f"  KEY `kv` (`v`){extra}\n) ENGINE={engine};".encode())
    main, *workers = routed(dump, 2, 64, monkeypatch)
    assert workers == []
    assert main.count(b"INSERT INTO `t` VALUES") == 3 + 1 and b"<SYNC>" not in main  # + the trigger's
