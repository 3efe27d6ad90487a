"""Physical backups: ``mariadb-backup --backup --stream=xbstream`` into the pipeline, and back.

Every copy records mariadb-backup's ``from_lsn``/``to_lsn``/``last_lsn`` (``xtrabackup_checkpoints``,
written beside the stream with ``--extra-lsndir``). A diff or incr is ``--incremental-lsn=<the
parent's to_lsn>``: only pages newer than it (``.delta`` files) plus the redo log and the files
InnoDB does not page. A restore unpacks the full, prepares it, then applies each increment in
order (``--prepare --incremental-dir``), each unpacked while the copy before it is prepared; no
local base directory needed.

Row counts: a physical copy is consistent as of the moment mariadb-backup holds
``BACKUP STAGE BLOCK_COMMIT``. We open a snapshot as soon as its log says it
holds that stage and keep the counts only if the snapshot's binlog position
equals the backup's: then both describe the same commits. Otherwise (writes in
the instant between) the manifest says the counts are unavailable rather than
recording numbers that do not describe the copy.

Counting there runs after the copy, so it adds its whole time to the backup.
When every counted table is InnoDB, the counts are first taken *during* the
copy in a snapshot of their own, and kept only if InnoDB's transaction counter
(``Trx id counter``, which every read-write transaction's start and commit
advance) read before that snapshot equals the one read after the snapshot at
BLOCK_COMMIT, and the binlog positions agree: then no transaction committed
between the two snapshots and both see the same rows. Once the counter moves
during the copy the early count is killed and the snapshot at BLOCK_COMMIT
counts, as before.

A diff or incr counts nothing: its copy stores only the pages changed since its
parent, and a count reads every row (and, unlike mariadb-backup, through the
buffer pool), so its cost would grow with the database, not with the change.
PostgreSQL's physical backups record no counts either; verification restores
the chain and runs its checks without a count to compare.
"""

from __future__ import annotations

import contextvars
import errno
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import pymysql

from backupd.errors import DriverError
from backupd.sandbox import Sandbox
from backupd.tool import DEVNULL, PIPE, Tool
from drivers.mysql.binlog import gtid_state
from drivers.mysql.client import ContentRejected, Credentials, check_content, query, scalar, tool_path, version_of
from drivers.mysql.logical import base_tables, count_rows, server_info, user_databases

STREAM = "physical"
BLOCK_COMMIT_LINE = b"Acquired locks for BACKUP STAGE BLOCK_COMMIT"
POSITION_RE = re.compile(rb"binlog position: filename '([^']+)', position '(\d+)'(?:, GTID of the last change '([^']*)')?")
COPY_CHUNK = 1 << 20
#: The line ``mariadb-backup --version`` prints, which it also writes at the top of every copy's log.
VERSION_RE = re.compile(rb"^(\S+ based on MariaDB server [^\n]*)$", re.M)
TRX_COUNTER_RE = re.compile(r"^Trx id counter (\d+)", re.M)
BINLOG_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,200}")
#: How often the copy's watcher checks whether the early count is still worth finishing.
COUNTER_POLL_SECONDS = 1.0


def trx_counter(conn: pymysql.connections.Connection) -> int | None:
    """InnoDB's transaction id counter; None if it cannot be read (no PROCESS privilege)."""
    try:
        rows = query(conn, "SHOW ENGINE INNODB STATUS")
    except pymysql.MySQLError:
        return None
    match = TRX_COUNTER_RE.search(str(rows[0][2])) if rows else None
    return int(match[1]) if match else None


def _snapshot_position(conn: pymysql.connections.Connection) -> tuple[str, int] | None:
    status = dict(query(conn, "SHOW STATUS LIKE 'binlog_snapshot_%'"))
    if status.get("Binlog_snapshot_file"):
        return str(status["Binlog_snapshot_file"]), int(status["Binlog_snapshot_position"])
    return None


class _EarlyCount(threading.Thread):
    """Row counts taken while the copy runs, in a snapshot that is only trusted if nothing committed since."""

    def __init__(self, credentials: Credentials, tables: list[tuple[str, str]]) -> None:
        super().__init__(name="mysql-early-counts", daemon=True)
        self.credentials, self.tables = credentials, tables
        self.conn: pymysql.connections.Connection | None = None  # connected in the thread, off the copy's start
        self.counter: int | None = None  # read before the snapshot opened
        self.position: tuple[str, int] | None = None
        self.counts: dict[str, int] | None = None
        self.abandoned = False

    def run(self) -> None:
        try:
            self.conn = conn = self.credentials.connect()
        except Exception:  # the snapshot at BLOCK_COMMIT counts instead
            return
        try:
            self.counter = trx_counter(conn)
            if self.counter is None or self.abandoned:
                return
            query(conn, "START TRANSACTION WITH CONSISTENT SNAPSHOT")
            self.position = _snapshot_position(conn)
            counts = count_rows(conn, self.tables)
            if not self.abandoned:
                self.counts = counts
        except Exception:  # killed, or failed: the snapshot at BLOCK_COMMIT counts instead
            self.counts = None
        finally:
            conn.close()

    def abandon(self, monitor: pymysql.connections.Connection) -> None:
        """A transaction committed since: stop scanning (KILL QUERY on our own session)."""
        self.abandoned = True
        if self.is_alive() and self.conn is not None:
            try:
                query(monitor, f"KILL QUERY {int(self.conn.thread_id())}")
            except pymysql.MySQLError:
                pass


class _Watcher(threading.Thread):
    """Waits for mariadb-backup to hold BLOCK_COMMIT, then opens the counting snapshot."""

    def __init__(self, tool: Tool, credentials: Credentials, tables: list[tuple[str, str]],
                 early: _EarlyCount | None = None) -> None:
        super().__init__(name="mysql-physical-counts", daemon=True)
        self.tool, self.credentials, self.tables, self.early = tool, credentials, tables, early
        self.done = threading.Event()
        self.position: tuple[str, int] | None = None
        self.counts: dict[str, int] = {}
        self.counted_early = False
        self.error: str | None = None

    def run(self) -> None:
        monitor = None
        try:
            checked = time.monotonic()
            while not self.done.wait(0.02):
                if BLOCK_COMMIT_LINE in self.tool.stderr_text(limit=1 << 16).encode() or self.tool.proc.poll() is not None:
                    break
                if self.early is not None and not self.early.abandoned and time.monotonic() - checked >= COUNTER_POLL_SECONDS:
                    checked = time.monotonic()
                    monitor = monitor or self.credentials.connect()
                    if self.early.counter is not None and trx_counter(monitor) != self.early.counter:
                        self.early.abandon(monitor)
            conn = self.credentials.connect()
            try:
                query(conn, "START TRANSACTION WITH CONSISTENT SNAPSHOT")
                self.position = _snapshot_position(conn)
                if self.early is not None:
                    after = trx_counter(conn)  # read after this snapshot opened: covers every commit before it
                    if after is not None and after == self.early.counter and not self.early.abandoned:
                        self.early.join()
                        if self.early.counts is not None and self.early.position == self.position:
                            self.counts, self.counted_early = self.early.counts, True
                            return
                    self.early.abandon(conn)
                self.counts = count_rows(conn, self.tables)
            finally:
                conn.close()
        except Exception as exc:  # counts are best effort; the copy itself is what must succeed
            self.error = str(exc)
        finally:
            if monitor is not None:
                monitor.close()


@dataclass(frozen=True)
class Increment:
    """What an incremental copy is taken against: the parent's server and ``to_lsn`` (DESIGN.md "Backup types")."""

    parent: str  #: the parent backup's id, for messages
    server: str  #: the parent's ``metadata.server``: an LSN means nothing on another server
    lsn: int  #: the parent's ``metadata.to_lsn`` (its checkpoint): pages newer than it are copied
    end: int  #: the parent's ``metadata.last_lsn``, where its copy ended: the server has been there since
    binlog: tuple[str, int, str] | None = None  #: the parent's binlog file, position and GTID, where recorded


def parent_lsn(manifest_id: str, metadata: dict[str, Any]) -> Increment:
    """The Increment a backup's manifest metadata allows; DriverError naming what it lacks."""
    lsn, server = metadata.get("to_lsn"), metadata.get("server")
    if not isinstance(lsn, int) or isinstance(lsn, bool) or lsn <= 0 or not isinstance(server, str):
        raise DriverError(f"backup {manifest_id} records no to_lsn (taken before incremental backups, or not by "
                          "mariadb-backup): an incremental cannot be taken against it",
                          hint="take a full backup first (`backupd backup JOB`)")
    end = metadata.get("last_lsn")
    if not isinstance(end, int) or isinstance(end, bool) or end < lsn:
        end = lsn
    return Increment(manifest_id, server, lsn, end, _binlog_coordinates(metadata.get("binlog")))


def _binlog_coordinates(recorded: object) -> tuple[str, int, str] | None:
    """A manifest's ``binlog`` (file, position, GTID list) if well formed; None (nothing to check) for
    anything else, such as a hostile manifest's text."""
    if not isinstance(recorded, dict):
        return None
    file, position, gtid = recorded.get("file"), recorded.get("position"), recorded.get("gtid")
    if not (isinstance(file, str) and BINLOG_NAME_RE.fullmatch(file) and isinstance(gtid, str)
            and isinstance(position, int) and not isinstance(position, bool)):
        return None
    try:
        gtid_state(gtid)
    except ValueError:
        return None
    return file, position, gtid


def continuity_problem(conn: pymysql.connections.Connection, increment: Increment, log_bin: bool) -> str | None:
    """Why the server's history no longer contains the parent's, as far as it can tell; None if it does.

    A server restored to an earlier point (or replaced by one with the same server id) keeps
    its id, but an increment against a backup of the lost history would silently miss every
    page changed since the restore point whose LSN is below the parent's checkpoint. Signs of
    it, each impossible on one continuous history:

    - InnoDB's current LSN below where the parent's copy ended (LSNs only grow);
    - a GTID domain of ``gtid_current_pos`` (what mariadb-backup records) missing or behind;
    - the server's binlog at the parent's coordinates (``BINLOG_GTID_POS``) ahead of the parent
      in a domain, or behind it in a domain that replication does not feed (a replica without
      ``log_slave_updates`` binlogs less than its ``gtid_current_pos``); a purged or shorter
      binlog file tells nothing.
    """
    rows = query(conn, "SHOW GLOBAL STATUS LIKE 'Innodb_lsn_current'")
    current = int(rows[0][1]) if rows and str(rows[0][1]).isdigit() else None
    if current is not None and current < increment.end:
        return _diverged(increment, f"its copy ended at LSN {increment.end}, beyond this server's current LSN {current}")
    if increment.binlog is None or not log_bin:  # binary logging off now: its GTID state tells nothing
        return None
    file, position, gtid = increment.binlog
    then = gtid_state(gtid)
    try:
        now = str(scalar(conn, "SELECT @@gtid_current_pos") or "")
        replicated = gtid_state(str(scalar(conn, "SELECT @@gtid_slave_pos") or ""))
        found = scalar(conn, "SELECT BINLOG_GTID_POS(%s, %s)", (file, position))
    except pymysql.MySQLError:  # the file unreadable: nothing to compare
        return None
    reached = gtid_state(now)
    for domain, seq in sorted(then.items()):
        if reached.get(domain, -1) < seq:
            return _diverged(increment, f"this server's GTID position is {now or '(none)'}, behind the backup's "
                                        f"{gtid} in domain {domain}")
    for domain, seq in sorted(gtid_state(str(found or "")).items()):
        if domain not in then or seq > then[domain] or (seq < then[domain] and domain not in replicated):
            return _diverged(increment, f"this server's binlog at {file}:{position} is at GTID {found}, the "
                                        f"backup's was {gtid or '(none)'}")
    return None


def _diverged(increment: Increment, why: str) -> str:
    return (f"backup {increment.parent} is not in this server's history ({why}): the server was restored to an "
            "earlier point or replaced since, and an incremental against it would miss changes")


def read_checkpoints(directory: Path) -> dict[str, int]:
    """``from_lsn``, ``to_lsn`` and ``last_lsn`` from mariadb-backup's ``xtrabackup_checkpoints``."""
    path = directory / "xtrabackup_checkpoints"
    values: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError as exc:
        raise DriverError(f"mariadb-backup wrote no {path.name} ({exc.strerror})") from None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() in ("from_lsn", "to_lsn", "last_lsn") and value.strip().isdigit():
            values[key.strip()] = int(value.strip())
    if "to_lsn" not in values or "from_lsn" not in values:
        raise DriverError(f"mariadb-backup's {path.name} names no from_lsn/to_lsn")
    return values


def take_backup(credentials: Credentials, defaults_file: str, work_dir: Path, sink: Callable[[str, Any], Any],
                timeout: float, databases: list[str], excluded: list[str],
                increment: Increment | None = None) -> dict[str, Any]:
    """One copy through ``sink``: a full, or with ``increment`` the pages changed since its LSN."""
    conn = credentials.connect()
    try:
        info = server_info(conn)
        chosen = user_databases(conn, databases, excluded)
        if increment is not None and increment.server != info.key:
            raise DriverError(f"backup {increment.parent} was taken from server {increment.server}, this one is "
                              f"{info.key}: its LSN means nothing here", hint="take a full backup of this server first")
        tables = base_tables(conn, chosen) if increment is None else []  # an increment counts nothing
        all_innodb = bool(tables) and _all_innodb(conn, chosen)
    finally:
        conn.close()
    target = work_dir / "mariadb-backup"
    lsn_dir = work_dir / "mariadb-backup-lsn"
    for path in (target, lsn_dir):
        shutil.rmtree(path, ignore_errors=True)
    argv = [tool_path("backup"), f"--defaults-extra-file={defaults_file}", "--backup", "--stream=xbstream",
            f"--target-dir={target}", f"--extra-lsndir={lsn_dir}"]
    if increment is not None:
        argv.append(f"--incremental-lsn={increment.lsn}")
    counting = info.flavor == "mariadb" and info.log_bin and increment is None
    early = _EarlyCount(credentials, tables) if counting and all_innodb else None
    if early:
        early.start()
    with Tool(argv) as tool:
        watcher = _Watcher(tool, credentials, tables, early) if counting else None
        if watcher:
            watcher.start()
        try:
            entry = sink(STREAM, tool.stdout)
            tool.check(timeout, "backup")
        finally:
            if watcher:
                watcher.done.set()
                watcher.join()
            if early and early.is_alive():  # the backup failed before the watcher was done with it
                _abandon(credentials, early)
            shutil.rmtree(target, ignore_errors=True)
        log_text = tool.stderr_text(limit=1 << 20).encode()
    try:
        if b"completed OK!" not in log_text:
            raise DriverError(f"{tool.name} exited 0 without reporting 'completed OK!'")
        lsns = read_checkpoints(lsn_dir)
    finally:
        shutil.rmtree(lsn_dir, ignore_errors=True)
    if increment is not None and lsns["from_lsn"] != increment.lsn:
        raise DriverError(f"{tool.name} copied from LSN {lsns['from_lsn']}, not the {increment.lsn} asked for")
    ended = lsns.get("last_lsn", lsns["to_lsn"])
    if increment is not None and ended < increment.end:  # the server went back during the copy
        raise DriverError(_diverged(increment, f"this copy ended at LSN {ended}, before the backup's {increment.end}"),
                          hint="take a full backup (`backupd backup JOB --type full`)")
    match = None
    for match in POSITION_RE.finditer(log_text):
        pass
    binlog = None
    if match:
        binlog = {"file": match[1].decode(), "position": int(match[2]),
                  "gtid": match[3].decode() if match[3] else None}
    counts: dict[str, int] = {}
    note = "no binlog position to tie counts to the copy"
    if increment is not None:
        note = "not counted: a diff or incr copies only the pages changed since its parent; a count reads every row"
    elif watcher and binlog:
        if watcher.error:
            note = f"counting failed: {watcher.error}"
        elif watcher.position == (binlog["file"], binlog["position"]):
            counts, note = watcher.counts, ("counted during the copy; no transaction committed from that snapshot "
                                            "to the copy's binlog position" if watcher.counted_early
                                            else "counted in a snapshot at the copy's binlog position")
        else:
            note = "commits happened while the copy ended; counts would not describe it"
    return {
        "metadata": {"flavor": info.flavor, "server_version": info.version, "server_id": info.server_id,
                     "server": info.key, "databases": chosen, "binlog": binlog, "row_counts_note": note, "stream_format": "xbstream",
                     "raw_bytes": entry.raw_size, **lsns},
        "row_counts": counts,
        "version": copy_version(log_text),
    }


def copy_version(log_text: bytes) -> str:
    """The version line mariadb-backup wrote at the top of the copy's log (what ``--version`` prints);
    ``--version`` itself when the log kept no such line."""
    match = VERSION_RE.search(log_text)
    return match[1].decode(errors="replace").strip() if match else version_of("backup")


def _abandon(credentials: Credentials, early: _EarlyCount) -> None:
    try:
        conn = credentials.connect()
    except DriverError:
        early.abandoned = True
        return
    try:
        early.abandon(conn)
    finally:
        conn.close()


def _all_innodb(conn: pymysql.connections.Connection, databases: list[str]) -> bool:
    marks = ", ".join(["%s"] * len(databases))
    engines = {str(row[0]).lower() for row in query(
        conn, f"SELECT DISTINCT engine FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
              f"AND table_schema IN ({marks})", databases)}
    return engines == {"innodb"}


def extract(stream: BinaryIO, dest: Path, sandbox: Sandbox | None = None) -> int:
    """Unpack an xbstream into ``dest`` through mbstream (in ``sandbox`` if given); return bytes fed.

    mbstream skips a member it refuses (an absolute name, one with ``..``) with a
    message on stderr and still exits 0; it says nothing when all is well. So any
    message fails the extraction: a copy missing a member is not a good restore.
    """
    with Tool([tool_path("stream"), "-x", "-C", str(dest)], stdin=PIPE, stdout=DEVNULL, sandbox=sandbox) as tool:
        size = tool.feed(stream, COPY_CHUNK)
        check_content(tool, "extracting the backup")
        if tool.stderr_text().strip():
            raise ContentRejected(f"{tool.name} refused part of the backup: {tool.stderr_summary()}",
                                  f"{tool.name} (extracting the backup) refused a member of the stream")
    return size


def prepare(dest: Path, timeout: float | None = None, sandbox: Sandbox | None = None,
            incremental_dir: Path | None = None) -> None:
    """``mariadb-backup --prepare``: crash recovery of the copy (in ``sandbox`` if given); with
    ``incremental_dir``, apply that extracted increment to the prepared copy in ``dest``."""
    argv = [tool_path("backup"), "--no-defaults", "--prepare", f"--target-dir={dest}"]
    if incremental_dir is not None:
        argv.append(f"--incremental-dir={incremental_dir}")
    with Tool(argv, stdout=DEVNULL, sandbox=sandbox) as tool:
        check_content(tool, "prepare" if incremental_dir is None else "applying an increment", timeout)


def restore_chain(chain: Sequence[tuple[str, Callable[[], BinaryIO]]], dest: Path, increments: Sequence[Path],
                  timeout: float | None = None, sandbox: Sandbox | None = None) -> int:
    """Extract and prepare a chain's copies into ``dest``: the full (first), then each increment in order,
    applied with ``--prepare --incremental-dir``. Returns the bytes fed to mbstream.

    Each increment is unpacked while the copy before it is prepared, into the two empty directories
    ``increments`` in turn (each emptied before it is reused, and at the end): the prepares run in
    chain order, and at most two increments are on disk at once.
    """
    (_, open_full), *rest = chain
    with open_full() as stream:
        size = extract(stream, dest, sandbox)

    def unpack(open_increment: Callable[[], BinaryIO], directory: Path) -> int:
        clear(directory)
        with open_increment() as stream:
            return extract(stream, directory, sandbox)

    with ThreadPoolExecutor(1, thread_name_prefix="mysql-extract") as ahead:
        previous: Path | None = None
        for index, (_, open_increment) in enumerate(rest):
            directory = increments[index % 2]
            unpacking = ahead.submit(contextvars.copy_context().run, unpack, open_increment, directory)
            try:
                prepare(dest, timeout, sandbox, incremental_dir=previous)
            except BaseException:
                wait([unpacking])  # nothing left writing into the directories the caller removes
                raise
            size += unpacking.result()
            previous = directory
    prepare(dest, timeout, sandbox, incremental_dir=previous)
    for directory in increments:
        clear(directory)
    return size


def staging_dir(dest: Path) -> Path:
    """An empty directory beside ``dest`` (same filesystem) to restore into before it becomes ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.backupd-", dir=dest.parent))


def install(staging: Path, dest: Path) -> None:
    """Make the restored copy in ``staging`` the directory ``dest``.

    A missing ``dest`` is simply renamed into place. An existing one (empty, or
    replaced with --force) keeps its inode (it may be a mount point): its entries
    are removed without following symbolic links (a link to a directory outside is
    unlinked, never emptied or written through), then the copy's entries moved in.
    """
    if not dest.exists() and not dest.is_symlink():
        os.rename(staging, dest)
        return
    clear(dest)
    for child in staging.iterdir():
        try:
            os.rename(child, dest / child.name)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.move(str(child), str(dest / child.name))
    staging.rmdir()


def clear(directory: Path) -> None:
    """Remove everything inside ``directory``; symbolic links are unlinked, not followed."""
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def binlog_info(dest: Path) -> dict[str, Any] | None:
    """Coordinates mariadb-backup stored in the copy (``xtrabackup_binlog_info``)."""
    path = dest / "xtrabackup_binlog_info"
    if not path.is_file():
        return None
    fields = path.read_text().split()
    if len(fields) < 2 or not fields[1].isdigit():
        return None
    return {"file": fields[0], "position": int(fields[1]), "gtid": fields[2] if len(fields) > 2 else None}
