"""Physical backups: ``mariadb-backup --backup --stream=xbstream`` into the pipeline, and back.

Row counts: a physical copy is consistent as of the moment mariadb-backup holds
``BACKUP STAGE BLOCK_COMMIT``. We open a snapshot as soon as its log says it
holds that stage and keep the counts only if the snapshot's binlog position
equals the backup's: then both describe the same commits. Otherwise (writes in
the instant between) the manifest says the counts are unavailable rather than
recording numbers that do not describe the copy.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable

from backupd.errors import DriverError
from drivers.mysql.client import Credentials, Tool, find_tool, query
from drivers.mysql.logical import base_tables, count_rows, server_info, user_databases

STREAM = "physical"
BLOCK_COMMIT_LINE = b"Acquired locks for BACKUP STAGE BLOCK_COMMIT"
POSITION_RE = re.compile(rb"binlog position: filename '([^']+)', position '(\d+)'(?:, GTID of the last change '([^']*)')?")
COPY_CHUNK = 1 << 20


class _Watcher(threading.Thread):
    """Waits for mariadb-backup to hold BLOCK_COMMIT, then opens the counting snapshot."""

    def __init__(self, tool: Tool, credentials: Credentials, tables: list[tuple[str, str]]) -> None:
        super().__init__(name="mysql-physical-counts", daemon=True)
        self.tool, self.credentials, self.tables = tool, credentials, tables
        self.done = threading.Event()
        self.position: tuple[str, int] | None = None
        self.counts: dict[str, int] = {}
        self.error: str | None = None

    def run(self) -> None:
        try:
            while not self.done.wait(0.02):
                if BLOCK_COMMIT_LINE in self.tool.stderr_text(limit=1 << 16).encode() or self.tool.proc.poll() is not None:
                    break
            conn = self.credentials.connect()
            try:
                query(conn, "START TRANSACTION WITH CONSISTENT SNAPSHOT")
                status = dict(query(conn, "SHOW STATUS LIKE 'binlog_snapshot_%'"))
                if status.get("Binlog_snapshot_file"):
                    self.position = (str(status["Binlog_snapshot_file"]), int(status["Binlog_snapshot_position"]))
                self.counts = count_rows(conn, self.tables)
            finally:
                conn.close()
        except Exception as exc:  # counts are best effort; the copy itself is what must succeed
            self.error = str(exc)


def take_backup(credentials: Credentials, defaults_file: str, work_dir: Path, sink: Callable[[str, Any], Any],
                timeout: float, databases: list[str], excluded: list[str]) -> dict[str, Any]:
    conn = credentials.connect()
    try:
        info = server_info(conn)
        chosen = user_databases(conn, databases, excluded)
        tables = base_tables(conn, chosen)
    finally:
        conn.close()
    target = work_dir / "mariadb-backup"
    shutil.rmtree(target, ignore_errors=True)
    argv = [find_tool("backup"), f"--defaults-extra-file={defaults_file}", "--backup", "--stream=xbstream",
            f"--target-dir={target}"]
    with Tool(argv) as tool:
        watcher = _Watcher(tool, credentials, tables) if info.flavor == "mariadb" and info.log_bin else None
        if watcher:
            watcher.start()
        try:
            entry = sink(STREAM, tool.stdout)
            tool.check(timeout, "backup")
        finally:
            if watcher:
                watcher.done.set()
                watcher.join()
            shutil.rmtree(target, ignore_errors=True)
        log_text = tool.stderr_text(limit=1 << 20).encode()
    if b"completed OK!" not in log_text:
        raise DriverError(f"{tool.name} exited 0 without reporting 'completed OK!'")
    match = None
    for match in POSITION_RE.finditer(log_text):
        pass
    binlog = None
    if match:
        binlog = {"file": match[1].decode(), "position": int(match[2]),
                  "gtid": match[3].decode() if match[3] else None}
    counts: dict[str, int] = {}
    note = "no binlog position to tie counts to the copy"
    if watcher and binlog:
        if watcher.error:
            note = f"counting failed: {watcher.error}"
        elif watcher.position == (binlog["file"], binlog["position"]):
            counts, note = watcher.counts, "counted in a snapshot at the copy's binlog position"
        else:
            note = "commits happened while the copy ended; counts would not describe it"
    return {
        "metadata": {"flavor": info.flavor, "server_version": info.version, "server_id": info.server_id,
                     "server": info.key, "databases": chosen, "binlog": binlog, "row_counts_note": note, "stream_format": "xbstream",
                     "raw_bytes": entry.raw_size},
        "row_counts": counts,
    }


def extract(stream: BinaryIO, dest: Path) -> int:
    """Unpack an xbstream into ``dest`` through mbstream; return bytes fed."""
    size = 0
    with Tool([find_tool("stream"), "-x", "-C", str(dest)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL) as tool:
        try:
            while chunk := stream.read(COPY_CHUNK):
                tool.stdin.write(chunk)
                size += len(chunk)
            tool.stdin.close()
        except BrokenPipeError:
            pass
        tool.check(what="extracting the backup")
    return size


def prepare(dest: Path, timeout: float | None = None) -> None:
    with Tool([find_tool("backup"), "--no-defaults", "--prepare", f"--target-dir={dest}"],
              stdout=subprocess.DEVNULL) as tool:
        tool.check(timeout, "prepare")


def binlog_info(dest: Path) -> dict[str, Any] | None:
    """Coordinates mariadb-backup stored in the copy (``xtrabackup_binlog_info``)."""
    path = dest / "xtrabackup_binlog_info"
    if not path.is_file():
        return None
    fields = path.read_text().split()
    if len(fields) < 2 or not fields[1].isdigit():
        return None
    return {"file": fields[0], "position": int(fields[1]), "gtid": fields[2] if len(fields) > 2 else None}
