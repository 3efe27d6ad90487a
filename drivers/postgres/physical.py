"""Physical backups: pg_basebackup's tar stream, watched in passing for backup_label and backup_manifest;
restores unpack it into a data directory set up for archive recovery."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from backupd import tool
from backupd.driver import BackupResult, BackupSource, DriverContext, StreamSink
from backupd.errors import DriverError
from backupd.manifest import PitrStart
from backupd.storage import Readable
from backupd.timeutil import utcnow
from drivers.postgres.connection import one, Conn, find_tool
from drivers.postgres.logical import tool_version
from drivers.postgres.options import PostgresOptions
from drivers.postgres.walnames import format_lsn, parse_lsn, segment_name, segno_of_lsn

BASE = "base"
BLOCK = 512
COPY_BUFFER = 1 << 20  # tarfile's defaults (10 KiB reads, 16 KiB writes) cost a syscall per few KiB
CAPTURE = {"backup_label": 1 << 20, "backup_manifest": 256 << 20, "tablespace_map": 1 << 20}


class TarWatcher:
    """Passes a tar stream through unchanged, keeping the contents of a few small members."""

    def __init__(self, source: Readable, capture: dict[str, int] = CAPTURE) -> None:
        self._source = source
        self._capture = capture
        self._header_buf = bytearray()
        self._remaining = 0  # data bytes of the current member still to pass
        self._padding = 0
        self._name = ""
        self._content: bytearray | None = None
        self.members: dict[str, bytes] = {}
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        if data:
            self._feed(memoryview(data))
        return data

    def _feed(self, view: memoryview) -> None:
        while view:
            if self._remaining:
                take = view[: self._remaining]
                if self._content is not None:
                    self._content += take
                self._remaining -= len(take)
                view = view[len(take):]
                if not self._remaining:
                    self._end_member()
                continue
            need = BLOCK - len(self._header_buf)
            self._header_buf += view[:need]
            view = view[need:]
            if len(self._header_buf) == BLOCK:
                self._header(bytes(self._header_buf))
                self._header_buf.clear()

    def _end_member(self) -> None:
        if self._content is not None:
            self.members[self._name] = bytes(self._content)
            self._content = None
        self._remaining, self._padding = self._padding, 0

    def _header(self, header: bytes) -> None:
        if header == b"\0" * BLOCK:
            return
        name = header[0:100].split(b"\0", 1)[0].decode(errors="replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode(errors="replace") if header[257:262] == b"ustar" else ""
        self._name = (f"{prefix}/{name}" if prefix else name).removeprefix("./")
        field = header[124:136]
        size = int.from_bytes(field[1:], "big") if field[0] & 0x80 else int(field.strip(b"\0 ") or b"0", 8)
        self.count += 1
        limit = self._capture.get(self._name)
        self._content = bytearray() if limit is not None and size <= limit else None
        self._remaining, self._padding = size, -size % BLOCK
        if not size:
            self._end_member()


def parse_label(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


@dataclass
class BackupPoints:
    timeline: int
    start_lsn: int
    stop_lsn: int
    label: str
    backup_from: str
    start_time: str


def backup_points(members: dict[str, bytes]) -> BackupPoints:
    if "backup_label" not in members:
        raise DriverError("pg_basebackup's stream held no backup_label; the backup is unusable")
    if "backup_manifest" not in members:
        raise DriverError("pg_basebackup's stream held no backup_manifest (PostgreSQL 13 or later is needed)")
    label = parse_label(members["backup_label"].decode())
    try:
        manifest = json.loads(members["backup_manifest"])
        ranges = manifest["WAL-Ranges"]
        start_lsn = parse_lsn(label["START WAL LOCATION"].split()[0])
        return BackupPoints(
            timeline=int(label.get("START TIMELINE", ranges[0]["Timeline"])),
            start_lsn=start_lsn,
            stop_lsn=parse_lsn(ranges[-1]["End-LSN"]),
            label=label.get("LABEL", ""),
            backup_from=label.get("BACKUP FROM", "primary"),
            start_time=label.get("START TIME", ""),
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise DriverError(f"cannot read the backup's label or manifest: {exc}") from None


def backup(conn: Conn, options: PostgresOptions, context: DriverContext, sink: StreamSink) -> BackupResult:
    settings = context.settings
    with conn.connect() as pg:
        version, segment_size, in_recovery, system_id = one(pg.execute(
            "SELECT current_setting('server_version_num')::int, "
            "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), "
            "pg_is_in_recovery(), (SELECT system_identifier FROM pg_control_system())"))
        spaces = [row[0] for row in pg.execute(
            "SELECT spcname FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY 1")]
    if spaces:
        raise DriverError(
            f"the cluster has tablespaces besides pg_default ({', '.join(spaces)}); a streamed physical backup "
            "holds one data directory only, so physical backups of this cluster are refused",
            hint="move those tables to pg_default, or use method = \"logical\"",
        )
    pg_basebackup = find_tool("pg_basebackup", options.bin_dir, version // 10000)
    wal_method = "none" if settings.archive_logs else "fetch"  # without an archive the backup carries its WAL
    argv = [pg_basebackup, "--pgdata=-", "--format=tar", f"--wal-method={wal_method}", "--checkpoint=fast",
            f"--label=backupd {context.job}", "--no-password", "--dbname", conn.conninfo()]
    with conn.tool_env(context.spool_dir) as env, tool.Tool(argv, env=env) as proc:
        watcher = TarWatcher(proc)
        entry = sink(BASE, watcher)
    if entry.raw_size != proc.size:
        raise DriverError(f"pg_basebackup wrote {proc.size} bytes but {entry.raw_size} were stored")
    points = backup_points(watcher.members)
    ended = utcnow()
    with conn.connect() as pg:
        snapshot = one(pg.execute("SELECT pg_current_snapshot()::text"))[0]
    first = segment_name(points.timeline, segno_of_lsn(points.start_lsn, segment_size), segment_size)
    last = segment_name(points.timeline, segno_of_lsn(points.stop_lsn - 1, segment_size), segment_size)
    timeline = f"{points.timeline:08X}"
    metadata: dict[str, Any] = {
        "server_version": version, "system_identifier": str(system_id), "timeline": points.timeline,
        "start_lsn": format_lsn(points.start_lsn), "stop_lsn": format_lsn(points.stop_lsn),
        "label": points.label, "backup_from": "standby" if in_recovery else points.backup_from,
        "start_time": points.start_time, "wal_segment_size": segment_size, "wal_method": wal_method,
        "wal_range": {"first": f"{timeline}/{first}", "last": f"{timeline}/{last}"},
        "xid_snapshot_after": snapshot, "files": watcher.count,
    }
    pitr = PitrStart("wal", f"{timeline}/{first}", ended) if settings.archive_logs else None
    return BackupResult(metadata=metadata, pitr=pitr,
                        tool_versions={"postgresql": str(version), "pg_basebackup": tool_version(pg_basebackup)})


# -- restore -------------------------------------------------------------------------------

def check_directory(dest: Path, force: bool) -> None:
    """Refuse a --to that is a file, holds a running server's directory, or is not empty without --force."""
    if dest.exists() and not dest.is_dir():
        raise DriverError(f"{dest}: exists and is not a directory; --to must name a data directory")
    if dest.is_dir() and any(dest.iterdir()):
        if (dest / "postmaster.pid").exists():
            raise DriverError(f"{dest}: a server may be running on it (postmaster.pid exists); stop it first")
        if not force:
            raise DriverError(f"{dest}: directory is not empty; refusing to overwrite it",
                              hint="pass --force to replace its contents, or choose an empty directory")


@contextlib.contextmanager
def staged_directory(dest: Path, force: bool) -> Iterator[Path]:
    """A directory to restore into that becomes ``dest`` only when the block succeeds.

    A failed restore leaves nothing that looks like a data directory: the work
    directory (a hidden sibling of ``dest``, or inside an existing ``dest``, which
    may be a mount point) is removed, and an existing ``dest`` keeps its contents.
    """
    check_directory(dest, force)
    if dest.is_dir():
        work = Path(tempfile.mkdtemp(prefix=".backupd-restore-", dir=dest))
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.backupd-restore-", dir=dest.parent))
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if work.parent == dest:
        for child in dest.iterdir():
            if child == work:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        for child in work.iterdir():
            child.rename(dest / child.name)
        work.rmdir()
    else:
        work.rename(dest)
    os.chmod(dest, 0o700)


def extract(stream: BinaryIO, dest: Path) -> int:
    """Unpack the base backup tar; refuses links and names escaping ``dest``. Returns the member count."""
    count = 0
    with tarfile.open(fileobj=stream, mode="r|", bufsize=COPY_BUFFER,  # type: ignore[call-overload]
                      copybufsize=COPY_BUFFER) as tar:  # (copybufsize: Python 3.11's tarfile takes it; typeshed not)
        for member in tar:
            name = member.name.removeprefix("./")
            parts = Path(name).parts
            if name.startswith("/") or ".." in parts:
                raise DriverError(f"backup tar member {member.name!r} points outside the data directory")
            if not (member.isfile() or member.isdir()):
                raise DriverError(f"backup tar member {member.name!r} is a link or device; refusing to restore it")
            member.name = name or "."
            tar.extract(member, dest, set_attrs=member.isfile())
            count += 1
    return count


def restore_files(source: BackupSource, dest: Path) -> int:
    with source.open(BASE) as stream:
        count = extract(stream, dest)  # type: ignore[arg-type]
    for stale in ("standby.signal", "recovery.signal", "postmaster.pid", "postmaster.opts"):
        (dest / stale).unlink(missing_ok=True)
    (dest / "pg_wal" / "archive_status").mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o700)
    return count
