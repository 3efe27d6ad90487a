"""The file engine: physical backups read from the data directory itself, between pg_backup_start and
pg_backup_stop on one held connection, by ``process_max`` workers.

Files go into tar objects (``data-NNNNN``: small files bundled up to ``BUNDLE_SIZE``, a large file
alone); ``base``, written last, holds pg_control (copied after every data file), the backup_label and
tablespace_map pg_backup_stop returned, and the WAL of a job that archives none; ``data-filemap``, the file map
(``drivers.postgres.filemap``), after it. A diff or incr
compares each file's chunk checksums with its parent's map: an unchanged file, or chunk range, is a
reference to the object of the backup that holds it; a changed file stores only its changed chunks.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from backupd.driver import BackupResult, DriverContext, StreamSink
from backupd.errors import DriverError
from backupd.manifest import Manifest, PitrStart
from backupd.timeutil import utcnow
from drivers.postgres import datadir
from drivers.postgres.connection import Conn, one
from drivers.postgres.filemap import (MAP_STREAM, STREAM_KEY, FileEntry, FileMap, Part, chunk_count, chunk_hash,
                                      chunk_length, encode, has_map, merge_parts)
from drivers.postgres.options import PostgresOptions
from drivers.postgres.physical import parse_label
from drivers.postgres.tarstream import Member, TarStream
from drivers.postgres.walnames import format_lsn, parse_lsn, segment_name, segno_of_lsn

log = structlog.get_logger(__name__)

BUNDLE_SIZE = 16 << 20
BASE = "base"
ENGINE = "files"


def workers(options: PostgresOptions) -> int:
    return options.process_max or os.cpu_count() or 1


def unusable(options: PostgresOptions, system_id: int | None = None) -> str | None:
    """Why the file engine cannot back this job up (then pg_basebackup does); None when it can."""
    if options.data_dir is None:
        return "no data_dir is configured"
    data_dir = Path(options.data_dir)
    if not os.access(data_dir / datadir.CONTROL_FILE, os.R_OK) or not os.access(data_dir / "base", os.R_OK | os.X_OK):
        return f"data_dir {data_dir} is not readable here (a remote cluster, or another OS user's)"
    if system_id is not None:
        try:
            local = datadir.system_identifier(data_dir)
        except (OSError, DriverError) as exc:
            return f"data_dir {data_dir}: {exc}"
        if local != system_id:
            return f"data_dir {data_dir} belongs to cluster {local}, the dsn reaches cluster {system_id}"
    return None


@dataclass
class Server:
    version: int
    segment_size: int
    in_recovery: bool
    system_id: int
    version_dir: str
    tablespaces: dict[str, str]  #: oid -> name


def describe_server(pg: Any) -> Server:
    version, segment_size, in_recovery, system_id, catalog = one(pg.execute(
        "SELECT current_setting('server_version_num')::int, "
        "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), "
        "pg_is_in_recovery(), (SELECT system_identifier FROM pg_control_system()), "
        "(SELECT catalog_version_no FROM pg_control_system())"))
    spaces = {str(oid): name for oid, name in pg.execute(
        "SELECT oid, spcname FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')")}
    return Server(version, segment_size, in_recovery, system_id, f"PG_{version // 10000}_{catalog}", spaces)


def parent_map(chain: list[Manifest], system_id: int, files: FileMap) -> tuple[FileMap, str] | None:
    """The file map the new backup is compared with (``files``, the chain's newest's), checked against the chain."""
    if not chain:
        return None
    parent = chain[-1]
    where = f"backup {parent.backup_id}"
    if str(parent.metadata.get("system_identifier")) != str(system_id):
        raise DriverError(f"{where} is of cluster {parent.metadata.get('system_identifier')}, not of this one "
                          f"({system_id})", hint="take a full backup first (--type full)")
    known = {m.backup_id for m in chain}
    strangers = {holder for holder in files.holders() if holder is not None} - known
    if strangers:
        raise DriverError(f"{where} references backups outside its chain: {', '.join(sorted(strangers))}")
    return files, parent.backup_id


def require_map(parent: Manifest) -> None:
    if not has_map(parent):
        raise DriverError(f"backup {parent.backup_id} was taken by pg_basebackup and has no file map to compare with",
                          hint="take a full backup with the file engine first (--type full)")


@dataclass
class Planned:
    found: datadir.Found
    parent: FileEntry | None
    hashes: list[str]  #: the file's current chunk checksums (parent's where it matched)
    changed: list[int]  #: chunks to store
    member: Member | None = None  #: the tar member that stores them


def hash_file(found: datadir.Found) -> list[str] | None:
    """Chunk checksums of a live file up to its listed size (None: it vanished)."""
    hashes = []
    try:
        with open(found.source, "rb", buffering=0) as handle:
            for index in range(chunk_count(found.size)):
                want = chunk_length(found.size, index)
                data = handle.read(want) or b""
                while len(data) < want and (more := handle.read(want - len(data))):
                    data += more
                hashes.append(chunk_hash(data + b"\0" * (want - len(data))))
    except FileNotFoundError:
        return None
    return hashes


def plan_file(found: datadir.Found, parent: FileEntry | None) -> Planned | None:
    count = chunk_count(found.size)
    if parent is None:
        return Planned(found, None, [], list(range(count)))
    hashes = hash_file(found)
    if hashes is None:
        return None
    changed = [i for i, digest in enumerate(hashes) if i >= len(parent.hashes) or parent.hashes[i] != digest]
    return Planned(found, parent, hashes, changed)


def bundles(members: list[Member]) -> list[list[Member]]:
    """Small members packed in path order up to BUNDLE_SIZE; a large one alone. Largest first (balance)."""
    out: list[list[Member]] = []
    current: list[Member] = []
    size = 0
    for member in sorted(members, key=lambda m: m.name):
        if member.data_size >= BUNDLE_SIZE:
            out.append([member])
            continue
        current.append(member)
        size += member.data_size + 512
        if size >= BUNDLE_SIZE:
            out.append(current)
            current, size = [], 0
    if current:
        out.append(current)
    return sorted(out, key=lambda b: -sum(m.data_size for m in b))


def parts_of(planned: Planned, obj: str, member: Member, parent_id: str | None) -> list[Part]:
    """Where each chunk of the file now lives: ours where stored, else where the parent said."""
    stored = {index: k for k, index in enumerate(member.chunks)}
    if planned.parent is None or len(stored) == chunk_count(planned.found.size):
        return [Part(None, obj, member.name, 0, len(member.chunks), 0)]
    inherited: dict[int, Part] = {}
    for part in planned.parent.parts:
        for offset in range(part.count):
            inherited[part.first + offset] = part
    per_chunk = []
    for index in range(chunk_count(planned.found.size)):
        if index in stored:
            per_chunk.append(Part(None, obj, member.name, index, 1, stored[index]))
        else:
            part = inherited[index].held_by(parent_id or "")
            per_chunk.append(Part(part.backup, part.object, part.member, index, 1,
                                  part.member_first + index - part.first))
    return merge_parts(per_chunk)


class Copier:
    """Runs the bundles through the sink on ``count`` threads; the first failure stops new ones from starting."""

    def __init__(self, sink: StreamSink, count: int) -> None:
        self.sink = sink
        self.count = count
        self.failed = threading.Event()
        self._lock = threading.Lock()
        self._next = 0

    def _name(self) -> str:
        with self._lock:
            self._next += 1
            return f"data-{self._next:05d}"

    def _store(self, bundle: list[Member]) -> tuple[str, list[Member]] | None:
        if self.failed.is_set():
            return None
        try:
            name = self._name()
            stream = TarStream(bundle)
            entry = self.sink(name, stream)
            if entry.raw_size != stream.size:
                raise DriverError(f"object {name}: {stream.size} bytes read but {entry.raw_size} stored")
            return name, bundle
        except BaseException:
            self.failed.set()
            raise

    def run(self, work: list[list[Member]]) -> list[tuple[str, list[Member]]]:
        """(object name, its members) for every bundle stored; raises the first failure once all have ended."""
        with ThreadPoolExecutor(max_workers=self.count, thread_name_prefix="pg-copy") as pool:
            futures = [pool.submit(self._store, bundle) for bundle in work]
            done = [future.result() for future in futures]
        return [item for item in done if item is not None]


def _wal_members(data_dir: Path, timeline: int, start: int, stop: int, segment_size: int) -> list[Member]:
    members = []
    for segno in range(segno_of_lsn(start, segment_size), segno_of_lsn(stop - 1, segment_size) + 1):
        name = segment_name(timeline, segno, segment_size)
        path = data_dir / "pg_wal" / name
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            raise DriverError(f"WAL segment {name} was removed before the backup could copy it",
                              hint="raise wal_keep_size, or set archive_logs = true") from None
        members.append(Member(f"pg_wal/{name}", path, len(content), 0, list(range(chunk_count(len(content)))),
                              content=content))
    return members


def _copy(planned: list[Planned], parent_id: str | None, taken: set[str], sink: StreamSink,
          count: int) -> dict[str, FileEntry]:
    """Unchanged files referenced, the others stored (whole, or their changed chunks) by ``count`` workers."""
    files: dict[str, FileEntry] = {}
    members: dict[int, Planned] = {}
    for item in planned:
        found = item.found
        if not item.changed:
            assert item.parent is not None
            files[found.path] = FileEntry(found.path, found.size, found.mtime_ns, item.hashes,
                                          [p.held_by(parent_id or "") for p in item.parent.parts])
            continue
        if f"{found.path}.blocks" in taken:  # a file of that name exists: no member may shadow it
            item.changed = list(range(chunk_count(found.size)))
        whole = len(item.changed) == chunk_count(found.size)
        member = Member(found.path if whole else f"{found.path}.blocks", found.source, found.size, found.mtime_ns,
                        item.changed)
        members[id(member)] = item
        item.member = member
    for obj, bundle in Copier(sink, count).run(bundles([item.member for item in members.values()
                                                        if item.member is not None])):
        for member in bundle:
            if member.vanished:
                continue  # dropped during the backup: replay removes it
            item = members[id(member)]
            stored = dict(zip(member.chunks, member.hashes))
            hashes = [stored.get(i) or item.hashes[i] for i in range(chunk_count(item.found.size))]
            files[item.found.path] = FileEntry(item.found.path, item.found.size, item.found.mtime_ns, hashes,
                                               parts_of(item, obj, member, parent_id))
    log.info("files copied", stored=len(members), referenced=len(files) - len(members))
    return files


def _in_memory(name: str, content: bytes, mtime_ns: int) -> Member:
    return Member(name, Path(name), len(content), mtime_ns, list(range(chunk_count(len(content)))), content=content)


def backup(conn: Conn, options: PostgresOptions, context: DriverContext, sink: StreamSink,
           backup_type: str = "full", chain: list[Manifest] | None = None,
           parent: FileMap | None = None) -> tuple[BackupResult, bytes]:
    """The backup and its file map's plaintext (stored as stream ``data-filemap``; the caller keeps it locally once
    the manifest is committed). ``parent``: the map of ``chain[-1]`` for a diff or incr."""
    settings = context.settings
    data_dir = Path(str(options.data_dir))
    label = f"backupd {context.job}"
    with conn.connect() as pg:
        server = describe_server(pg)
        if server.version < 150000:
            raise DriverError(f"the file engine needs PostgreSQL 15 or later (server is {server.version})")
        if reason := unusable(options, server.system_id):
            raise DriverError(f"the file engine cannot read the cluster: {reason}")
        base = parent_map(chain or [], server.system_id, parent) if backup_type != "full" and parent else None
        parent_files, parent_id = (base[0].files, base[1]) if base else ({}, None)
        try:
            start_lsn = parse_lsn(one(pg.execute("SELECT pg_backup_start(%s, true)::text", (label,)))[0])
        except Exception as exc:
            raise DriverError(f"pg_backup_start failed: {str(exc).strip()}",
                              hint="GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), pg_backup_stop(boolean) "
                                   "TO the backup role") from None
        log.info("pg_backup_start done", start_lsn=format_lsn(start_lsn))
        listing, spaces = datadir.scan(data_dir, server.tablespaces, server.version_dir)
        count = workers(options)
        candidates = [found for found in listing.files if found.path != datadir.CONTROL_FILE]
        with ThreadPoolExecutor(max_workers=count, thread_name_prefix="pg-hash") as pool:
            planned = [p for p in pool.map(lambda f: plan_file(f, parent_files.get(f.path)), candidates) if p]
        log.info("files compared", files=len(listing.files), with_parent=len(parent_files))
        files = _copy(planned, parent_id, {found.path for found in listing.files}, sink, count)
        control = (data_dir / datadir.CONTROL_FILE).read_bytes()  # after every data file
        stop_lsn_text, labelfile, spcmapfile = one(pg.execute(
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(%s)", (bool(settings.archive_logs),)))
    log.info("pg_backup_stop done", stop_lsn=stop_lsn_text)
    stop_lsn = parse_lsn(stop_lsn_text)
    fields = parse_label(labelfile)
    timeline = int(fields.get("START TIMELINE", "1"))
    now_ns = int(utcnow().timestamp() * 1e9)
    base_members = [_in_memory(datadir.CONTROL_FILE, control, now_ns),
                    _in_memory("backup_label", labelfile.encode(), now_ns)]
    if spcmapfile:
        base_members.append(_in_memory("tablespace_map", spcmapfile.encode(), now_ns))
    if not settings.archive_logs:
        base_members += _wal_members(data_dir, timeline, start_lsn, stop_lsn, server.segment_size)
    stream = TarStream(base_members)
    entry = sink(BASE, stream)
    if entry.raw_size != stream.size:
        raise DriverError(f"object {BASE}: {stream.size} bytes read but {entry.raw_size} stored")
    for member in base_members:
        files[member.name] = FileEntry(member.name, member.file_size, member.mtime_ns, member.hashes,
                                       [Part(None, BASE, member.name, 0, len(member.chunks), 0)])
    map_data, map_facts = encode(FileMap(files, listing.dirs))
    stored = sink(MAP_STREAM, io.BytesIO(map_data))
    if stored.raw_size != len(map_data):
        raise DriverError(f"object {MAP_STREAM}: {len(map_data)} bytes written but {stored.raw_size} stored")
    ended = utcnow()
    with conn.connect() as pg:
        snapshot = one(pg.execute("SELECT pg_current_snapshot()::text"))[0]
    segment_size = server.segment_size
    first = segment_name(timeline, segno_of_lsn(start_lsn, segment_size), segment_size)
    last = segment_name(timeline, segno_of_lsn(stop_lsn - 1, segment_size), segment_size)
    tli = f"{timeline:08X}"
    metadata: dict[str, Any] = {
        "server_version": server.version, "system_identifier": str(server.system_id), "timeline": timeline,
        "start_lsn": format_lsn(start_lsn), "stop_lsn": format_lsn(stop_lsn),
        "label": fields.get("LABEL", label), "backup_from": "standby" if server.in_recovery else "primary",
        "start_time": fields.get("START TIME", ""), "wal_segment_size": segment_size,
        "wal_method": "none" if settings.archive_logs else "fetch",
        "wal_range": {"first": f"{tli}/{first}", "last": f"{tli}/{last}"},
        "xid_snapshot_after": snapshot, "files": len(files), "engine": ENGINE, "process_max": count,
        "stored_files": sum(1 for e in files.values() if any(p.backup is None for p in e.parts)),
        "tablespaces": [{"oid": t.oid, "name": t.name, "location": t.location, "version_dir": t.version_dir}
                        for t in spaces],
        STREAM_KEY: map_facts,
    }
    pitr = PitrStart("wal", f"{tli}/{first}", ended) if settings.archive_logs else None
    return BackupResult(metadata=metadata, pitr=pitr, tool_versions={"postgresql": str(server.version)}), map_data
