"""Logical backups: mysqldump/mariadb-dump with binlog coordinates and consistent row counts.

Consistency: one session blocks commits for an instant (``BACKUP STAGE
BLOCK_COMMIT`` on MariaDB, ``FLUSH TABLES WITH READ LOCK`` on MySQL) while a
second session opens a consistent snapshot and the dump opens its own; the
lock is released as soon as the dump has printed its binlog coordinates (it
prints them after its snapshot exists). Both snapshots therefore see the same
commits, and the coordinates are where binlog replay must start.

Row counts come from the dump stream itself (drivers.mysql.rowcount) when the
dump writes one row per line, so counting costs no second scan on the server;
otherwise ``SELECT COUNT(*)`` runs in our snapshot, which sees exactly what the
dump holds.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import pymysql

from backupd.errors import DriverError
from backupd.timeutil import format_timestamp, utcnow
from backupd.tool import Tool
from drivers.mysql.client import Credentials, query, quote_ident, scalar, tool_path, variable
from drivers.mysql.options import SYSTEM_SCHEMAS
from drivers.mysql.rowcount import RowCounter

STREAM = "dump"
LOCK_WAIT_SECONDS = 60
HEADER_LIMIT = 64 * 1024
CHANGE_MASTER_RE = re.compile(rb"CHANGE (?:MASTER|REPLICATION SOURCE) TO (?:MASTER|SOURCE)_LOG_FILE='([^']+)', "
                              rb"(?:MASTER|SOURCE)_LOG_POS=(\d+)")
TRAILER = b"-- Dump completed"
READ_SIZE = 1 << 20
TAIL = 512


@dataclass
class ServerInfo:
    version: str
    flavor: str  # mariadb | mysql
    server_id: int
    server_uuid: str | None
    log_bin: bool
    binlog_format: str | None
    gtid_mode: str | None  # MySQL only

    @property
    def key(self) -> str:
        """The directory the server's binlogs are archived under."""
        return self.server_uuid or str(self.server_id)


def server_info(conn: pymysql.connections.Connection) -> ServerInfo:
    version = str(scalar(conn, "SELECT VERSION()"))
    flavor = "mariadb" if "mariadb" in version.lower() else "mysql"
    uuid = variable(conn, "server_uuid") if flavor == "mysql" else None
    return ServerInfo(
        version=version,
        flavor=flavor,
        server_id=int(variable(conn, "server_id") or 0),
        server_uuid=uuid,
        log_bin=(variable(conn, "log_bin") or "OFF").upper() == "ON",
        binlog_format=variable(conn, "binlog_format"),
        gtid_mode=variable(conn, "gtid_mode") if flavor == "mysql" else None,
    )


def user_databases(conn: pymysql.connections.Connection, wanted: list[str], excluded: list[str]) -> list[str]:
    present = [row[0] for row in query(conn, "SHOW DATABASES")]
    if wanted:
        missing = [name for name in wanted if name not in present]
        if missing:
            raise DriverError(f"databases not found on the server: {', '.join(missing)}")
        chosen = list(wanted)
    else:
        chosen = [name for name in present if name not in SYSTEM_SCHEMAS]
    chosen = [name for name in chosen if name not in excluded]
    if not chosen:
        raise DriverError("no user databases to dump (all are system schemas or excluded)")
    return chosen


def base_tables(conn: pymysql.connections.Connection, databases: list[str]) -> list[tuple[str, str]]:
    marks = ", ".join(["%s"] * len(databases))
    return [(db, table) for db, table in query(
        conn,
        f"SELECT table_schema, table_name FROM information_schema.tables "
        f"WHERE table_type = 'BASE TABLE' AND table_schema IN ({marks}) ORDER BY table_schema, table_name",
        databases,
    )]


def count_rows(conn: pymysql.connections.Connection, tables: list[tuple[str, str]]) -> dict[str, int]:
    return {f"{db}.{table}": int(scalar(conn, f"SELECT COUNT(*) FROM {quote_ident(db)}.{quote_ident(table)}"))
            for db, table in tables}


class CommitBlock:
    """Blocks commits server-wide from its own session until released."""

    def __init__(self, credentials: Credentials, info: ServerInfo) -> None:
        self.conn = credentials.connect()
        self.flavor = info.flavor
        self.held = False
        try:
            query(self.conn, f"SET SESSION lock_wait_timeout = {LOCK_WAIT_SECONDS}")
            if self.flavor == "mariadb":
                query(self.conn, "BACKUP STAGE START")
                query(self.conn, "BACKUP STAGE BLOCK_COMMIT")
            else:
                query(self.conn, "FLUSH TABLES WITH READ LOCK")
        except pymysql.MySQLError as exc:
            self.conn.close()
            raise DriverError(f"cannot block commits for a consistent snapshot: {exc.args[-1]}",
                              hint="the backup user needs the RELOAD privilege") from None
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                query(self.conn, "BACKUP STAGE END" if self.flavor == "mariadb" else "UNLOCK TABLES")
            finally:
                self.conn.close()


@dataclass
class Snapshot:
    conn: pymysql.connections.Connection
    taken_at: Any
    binlog_file: str | None = None
    binlog_position: int | None = None
    gtid: str | None = None


def open_snapshot(credentials: Credentials, info: ServerInfo) -> Snapshot:
    conn = credentials.connect()
    query(conn, "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    query(conn, "START TRANSACTION WITH CONSISTENT SNAPSHOT")
    snap = Snapshot(conn, utcnow())
    if info.log_bin:
        status = query(conn, "SHOW MASTER STATUS")
        if status:
            snap.binlog_file, snap.binlog_position = str(status[0][0]), int(status[0][1])
        if info.flavor == "mariadb":
            snap.gtid = variable(conn, "gtid_binlog_pos") or None
        elif (info.gtid_mode or "").upper() == "ON":
            snap.gtid = variable(conn, "gtid_executed") or None
    return snap


@dataclass
class DumpReader:
    """The dump's stdout as the pipeline reads it: counts rows, remembers the tail to prove the dump completed."""

    tool: Tool
    head: bytes
    counter: RowCounter | None = None
    tail: bytes = b""
    size: int = 0
    _head_sent: bool = field(default=False, repr=False)

    def read(self, size: int = -1) -> bytes:
        if not self._head_sent:
            self._head_sent = True
            if self.head:
                return self._seen(self.head)
        return self._seen(self.tool.stdout.read(size if size and size > 0 else READ_SIZE))

    def _seen(self, data: bytes) -> bytes:
        if data:
            self.size += len(data)
            self.tail = (self.tail + data[-TAIL:])[-TAIL:]
            if self.counter is not None and self.counter.exact:
                self.counter.feed(data)
        return data


class SqlCounts(threading.Thread):
    """``SELECT COUNT(*)`` per table in the snapshot, in the background, started only if needed."""

    def __init__(self, conn: pymysql.connections.Connection, tables: list[tuple[str, str]]) -> None:
        super().__init__(name="mysql-row-counts", daemon=True)
        self.conn, self.tables = conn, tables
        self.counts: dict[str, int] = {}
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def begin(self, why: str = "") -> None:
        with self._lock:
            if self.ident is None:
                self.start()

    def run(self) -> None:
        try:
            self.counts = count_rows(self.conn, self.tables)
        except BaseException as exc:  # reported after the dump
            self.error = exc

    def result(self) -> dict[str, int]:
        self.begin()
        self.join()
        if self.error is not None:
            raise DriverError(f"counting rows in the dump's snapshot failed: {self.error}")
        return self.counts


def _read_header(tool: Tool, want_coordinates: bool) -> tuple[bytes, tuple[str, int] | None]:
    """Read the dump's header up to the line proving its snapshot exists."""
    lines: list[bytes] = []
    size = 0
    while size < HEADER_LIMIT:
        line = tool.stdout.readline()
        if not line:
            break
        lines.append(line)
        size += len(line)
        match = CHANGE_MASTER_RE.search(line)
        if match and want_coordinates:
            return b"".join(lines), (match[1].decode(), int(match[2]))
        if line.startswith(b"-- Current Database:") and not want_coordinates:
            return b"".join(lines), None
    if want_coordinates:
        tool.kill()
        raise DriverError(f"{tool.name} printed no binlog coordinates: {tool.stderr_summary()}")
    return b"".join(lines), None


def dump_argv(defaults_file: str, info: ServerInfo, databases: list[str]) -> list[str]:
    argv = [tool_path("dump"), f"--defaults-extra-file={defaults_file}", "--single-transaction", "--quick",
            "--routines", "--events", "--triggers", "--hex-blob", "--default-character-set=utf8mb4"]
    if info.log_bin:
        argv.append("--master-data=2" if info.flavor == "mariadb" else "--source-data=2")
        if info.flavor == "mysql" and (info.gtid_mode or "").upper() == "ON":
            argv.append("--set-gtid-purged=COMMENTED")
    return argv + ["--databases", *databases]


def take_dump(credentials: Credentials, databases_wanted: list[str], excluded: list[str],
              sink: Callable[[str, Any], Any], defaults_file: str, timeout: float) -> dict[str, Any]:
    """Stream one consistent dump into ``sink``; return metadata, row counts and versions."""
    conn = credentials.connect()
    try:
        info = server_info(conn)
        databases = user_databases(conn, databases_wanted, excluded)
        tables = base_tables(conn, databases)
    finally:
        conn.close()

    block = CommitBlock(credentials, info)
    snapshot: Snapshot | None = None
    tool: Tool | None = None
    try:
        snapshot = open_snapshot(credentials, info)
        tool = Tool(dump_argv(defaults_file, info, databases))
        head, coordinates = _read_header(tool, info.log_bin)
        block.release()
        if coordinates and (coordinates[0], coordinates[1]) != (snapshot.binlog_file, snapshot.binlog_position):
            raise DriverError(
                f"dump snapshot at {coordinates[0]}:{coordinates[1]} differs from the counting snapshot at "
                f"{snapshot.binlog_file}:{snapshot.binlog_position}; commits were not blocked")
        fallback = SqlCounts(snapshot.conn, tables)
        counter = RowCounter(on_inexact=fallback.begin)
        if any("\n" in name for pair in tables for name in pair):
            counter.give_up("a database or table name contains a newline")
        reader = DumpReader(tool, head, counter)
        entry = sink(STREAM, reader)
        tool.check(timeout, "dump")
        if TRAILER not in reader.tail:
            raise DriverError(f"{tool.name} output ends without '{TRAILER.decode()}': the dump is incomplete")
        if entry.raw_size != reader.size:
            raise DriverError(f"stored {entry.raw_size} bytes of a {reader.size}-byte dump")
        counter.finish()
        listed = {f"{db}.{table}" for db, table in tables}
        if counter.exact and set(counter.counts) != listed:
            counter.give_up(f"the dump's tables differ from the {len(listed)} listed before it")
        if counter.exact:
            counts, note = counter.counts, "counted in the dump stream"
        else:
            counts = fallback.result()
            note = f"counted with SELECT COUNT(*) in the dump's snapshot ({counter.why})"
    finally:
        block.release()
        if tool is not None:
            tool.close()
        if snapshot is not None:
            snapshot.conn.close()

    binlog = None
    if snapshot.binlog_file:
        binlog = {"file": snapshot.binlog_file, "position": snapshot.binlog_position, "gtid": snapshot.gtid}
    return {
        "metadata": {
            "flavor": info.flavor,
            "server_version": info.version,
            "server_id": info.server_id,
            "server": info.key,
            "binlog_format": info.binlog_format,
            "databases": databases,
            "all_databases": not databases_wanted and not excluded,
            "binlog": binlog,
            "snapshot_at": format_timestamp(snapshot.taken_at),
            "row_counts_note": note,
        },
        "row_counts": counts,
    }
