"""Restoring a file-engine backup: every file from the newest backup of the chain that holds each of its
chunks, objects read in parallel (``base``, with pg_control, last), tablespaces placed where the backup or
``--tablespace-map`` says. With ``delta`` an existing data directory is compared chunk by chunk: only
chunks whose checksum differs are fetched, and files the backup lacks are removed."""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from backupd.driver import BackupSource
from backupd.errors import DriverError, IntegrityError, UsageError
from backupd.manifest import Manifest
from drivers.postgres.engine import BASE
from drivers.postgres.filemap import (CHUNK, MAP_STREAM, FileEntry, chunk_count, chunk_hash, chunk_length, has_map,
                                      read_map)

VERSION_DIR = re.compile(r"^PG_\d+_\d+$")
COPY_BUFFER = 1 << 20


@dataclass(frozen=True)
class Space:
    oid: str
    name: str
    location: Path  #: where it goes (the backup's location, or --tablespace-map's)
    version_dir: str


def is_file_engine(manifest: Manifest) -> bool:
    return has_map(manifest)


def tablespaces(manifest: Manifest, mapping: dict[str, str]) -> list[Space]:
    """The backup's tablespaces, relocated by ``mapping`` (name or oid -> directory); unknown names refused."""
    raw = manifest.metadata.get("tablespaces", [])
    where = f"backup {manifest.backup_id}"
    if not isinstance(raw, list):
        raise IntegrityError(f"{where}: metadata.tablespaces is not a list")
    spaces: list[Space] = []
    names: set[str] = set()
    for item in raw:
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in
                                                 ("oid", "name", "location", "version_dir")):
            raise IntegrityError(f"{where}: a tablespace entry is malformed")
        if not item["oid"].isdigit() or not VERSION_DIR.match(item["version_dir"]):
            raise IntegrityError(f"{where}: tablespace {item['oid']!r} has a malformed oid or directory")
        target = mapping.get(item["name"]) or mapping.get(item["oid"]) or item["location"]
        if not os.path.isabs(target):
            raise IntegrityError(f"{where}: tablespace {item['name']} location {target!r} is not absolute")
        spaces.append(Space(item["oid"], item["name"], Path(target), item["version_dir"]))
        names.update((item["name"], item["oid"]))
    unknown = sorted(set(mapping) - names)
    if unknown:
        known = ", ".join(sorted(s.name for s in spaces)) or "none"
        raise UsageError(f"--tablespace-map: backup {manifest.backup_id} has no tablespace {', '.join(unknown)} "
                         f"(it has: {known})")
    return spaces


def check_tablespaces(spaces: list[Space], data: Path, delta: bool) -> None:
    """Refuse a tablespace location inside the data directory, shared by two, or (without --delta) not empty."""
    seen: set[Path] = set()
    for space in spaces:
        location = space.location
        if location in seen:
            raise UsageError(f"tablespace {space.name}: {location} is the location of another tablespace too")
        seen.add(location)
        if location == data or data in location.parents:
            raise UsageError(f"tablespace {space.name}: {location} is inside the data directory {data}")
        own = location / space.version_dir
        if location.exists() and not location.is_dir():
            raise UsageError(f"tablespace {space.name}: {location} exists and is not a directory")
        if not delta and own.is_dir() and any(own.iterdir()):
            raise UsageError(f"tablespace {space.name}: {own} is not empty; refusing to overwrite it",
                             hint="relocate it with --tablespace-map NAME=DIR, or restore over it with --delta")


@dataclass
class Placement:
    data: Path
    spaces: dict[str, Space]

    def place(self, path: str) -> Path:
        parts = path.split("/")
        if parts[0] == "pg_tblspc" and len(parts) >= 3:
            space = self.spaces.get(parts[1])
            if space is None:
                raise IntegrityError(f"{path}: a file of tablespace {parts[1]}, which the backup does not list")
            return space.location.joinpath(*parts[2:])
        return self.data / path


@dataclass
class Run:
    member_first: int
    count: int
    entry: FileEntry
    first: int


@dataclass
class Outcome:
    files: int = 0
    rewritten: int = 0
    removed: int = 0
    fetched_bytes: int = 0
    objects: int = 0
    notes: list[str] = field(default_factory=list)


def open_object(source: BackupSource, holder: str, name: str) -> BinaryIO:
    if holder == source.manifest.backup_id:
        return source.open(name)
    open_from = getattr(source, "open_from", None)
    if open_from is None:
        raise DriverError(f"backup {source.manifest.backup_id} references backup {holder}, which this restore "
                          "cannot read")
    return open_from(holder, name)  # type: ignore[no-any-return]


def _current_hashes(path: Path, entry: FileEntry) -> list[str | None]:
    """Chunk checksums of what ``path`` holds now, at the backup's chunk boundaries (None: absent there)."""
    hashes: list[str | None] = []
    try:
        with open(path, "rb", buffering=0) as handle:
            for index in range(chunk_count(entry.size)):
                want = chunk_length(entry.size, index)
                data = handle.read(want)
                hashes.append(chunk_hash(data) if len(data) == want else None)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return [None] * chunk_count(entry.size)
    return hashes


class Restorer:
    def __init__(self, source: BackupSource, placement: Placement, workers: int, delta: bool) -> None:
        self.source = source
        self.manifest = source.manifest
        self.placement = placement
        self.workers = workers
        self.delta = delta
        self.files = read_map(self.manifest, open_stream=lambda: source.open(MAP_STREAM))
        self.outcome = Outcome(files=len(self.files.files))
        self._check_references()

    def _check_references(self) -> None:
        """Every object the map names exists in the chain's manifests: refused before the target is touched."""
        own = self.manifest.backup_id
        chain = getattr(self.source, "chain", None) or [self.manifest]
        objects = {(m.backup_id, obj.name) for m in chain for obj in m.objects}
        for entry in self.files.files.values():
            for part in entry.parts:
                if (part.backup or own, part.object) not in objects:
                    raise IntegrityError(f"backup {own}: {entry.path} is held by object {part.object} of backup "
                                         f"{part.backup or own}, which its chain does not have")

    def run(self) -> Outcome:
        self._directories()
        needed = self._needed()
        plan = self._plan(needed)
        self._prepare(needed)
        ordered = sorted(plan, key=lambda key: key[1] == BASE)  # base (pg_control) after every data object
        data_objects = [key for key in ordered if key[1] != BASE]
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="pg-restore") as pool:
            for result in pool.map(lambda key: self._fetch(key, plan[key]), data_objects):
                self.outcome.fetched_bytes += result
        for key in ordered[len(data_objects):]:
            self.outcome.fetched_bytes += self._fetch(key, plan[key])
        self.outcome.objects = len(plan)
        if self.delta:
            self._remove_extras()
        for entry in self.files.files.values():
            os.utime(self.placement.place(entry.path), ns=(entry.mtime_ns, entry.mtime_ns))
        return self.outcome

    def _directories(self) -> None:
        data = self.placement.data
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        (data / "pg_tblspc").mkdir(mode=0o700, exist_ok=True)
        for space in self.placement.spaces.values():
            space.location.mkdir(mode=0o700, parents=True, exist_ok=True)
            link = data / "pg_tblspc" / space.oid
            if link.is_symlink() or link.is_file():
                link.unlink()
            elif link.is_dir():
                shutil.rmtree(link)
            link.symlink_to(space.location)
        for directory in sorted(self.files.dirs):
            parts = directory.split("/")
            if parts[0] == "pg_tblspc" and len(parts) < 3:
                continue  # pg_tblspc itself, or a link made above
            path = self.placement.place(directory)
            if path.is_symlink() or path.is_file():
                path.unlink()
            path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _needed(self) -> dict[str, set[int]]:
        entries = list(self.files.files.values())
        if not self.delta:
            return {e.path: set(range(chunk_count(e.size))) for e in entries}

        def differing(entry: FileEntry) -> set[int]:
            now = _current_hashes(self.placement.place(entry.path), entry)
            return {i for i, digest in enumerate(now) if digest != entry.hashes[i]}

        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="pg-compare") as pool:
            found = dict(zip((e.path for e in entries), pool.map(differing, entries)))
        self.outcome.rewritten = sum(1 for chunks in found.values() if chunks)
        return found

    def _plan(self, needed: dict[str, set[int]]) -> dict[tuple[str, str], dict[str, list[Run]]]:
        own = self.manifest.backup_id
        plan: dict[tuple[str, str], dict[str, list[Run]]] = {}
        for path, chunks in needed.items():
            if not chunks:
                continue
            entry = self.files.files[path]
            for part in entry.parts:
                run: Run | None = None
                for offset in range(part.count):
                    index = part.first + offset
                    if index not in chunks:
                        run = None
                        continue
                    if run is None:
                        run = Run(part.member_first + offset, 0, entry, index)
                        plan.setdefault((part.backup or own, part.object), {}).setdefault(part.member, []).append(run)
                    run.count += 1
        return plan

    def _prepare(self, needed: dict[str, set[int]]) -> None:
        for path, chunks in needed.items():
            entry = self.files.files[path]
            target = self.placement.place(path)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.is_symlink():
                target.unlink()
            if not chunks and target.stat().st_size == entry.size:
                continue
            fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, entry.size)
            finally:
                os.close(fd)

    def _fetch(self, key: tuple[str, str], members: dict[str, list[Run]]) -> int:
        holder, name = key
        where = f"object {name} of backup {holder}"
        written = 0
        remaining = dict(members)
        with open_object(self.source, holder, name) as stream:
            with tarfile.open(fileobj=stream, mode="r|", bufsize=COPY_BUFFER) as tar:  # type: ignore[call-overload]
                for member in tar:
                    runs = remaining.pop(member.name, None)
                    if runs is None:
                        continue
                    if not member.isfile():
                        raise IntegrityError(f"{where}: member {member.name!r} is not a regular file")
                    handle = tar.extractfile(member)
                    assert handle is not None
                    written += self._write_member(handle, sorted(runs, key=lambda r: r.member_first), where,
                                                  member.name)
                    if not remaining:
                        break
        if remaining:
            raise IntegrityError(f"{where} lacks {', '.join(sorted(remaining)[:3])}")
        return written

    def _write_member(self, handle: Any, runs: list[Run], where: str, member: str) -> int:
        position = 0
        written = 0
        for run in runs:
            skip = run.member_first * CHUNK - position
            while skip > 0:
                got = len(handle.read(min(skip, COPY_BUFFER)))
                if not got:
                    raise IntegrityError(f"{where}: member {member} is shorter than the file map says")
                skip -= got
                position += got
            fd = os.open(self.placement.place(run.entry.path), os.O_WRONLY)
            try:
                for index in range(run.first, run.first + run.count):
                    want = chunk_length(run.entry.size, index)
                    data = handle.read(want)
                    position += len(data)
                    if len(data) != want or chunk_hash(data) != run.entry.hashes[index]:
                        raise IntegrityError(f"{where}: {run.entry.path} chunk {index} does not match its checksum")
                    os.pwrite(fd, data, index * CHUNK)
                    written += want
            finally:
                os.close(fd)
        return written

    def _remove_extras(self) -> None:
        """Files and directories the backup lacks, in the data directory and the tablespaces' own directories."""
        keep_files = {self.placement.place(path) for path in self.files.files}
        keep_dirs = {self.placement.place(d) for d in self.files.dirs if not d.startswith("pg_tblspc/")
                     or len(d.split("/")) >= 3}
        roots = [self.placement.data] + [s.location / s.version_dir for s in self.placement.spaces.values()]
        links = {self.placement.data / "pg_tblspc" / oid for oid in self.placement.spaces}
        for root in roots:
            for directory, dirs, names in os.walk(root, topdown=True):
                here = Path(directory)
                for name in names:
                    path = here / name
                    if path not in keep_files and path not in links:
                        path.unlink()
                        self.outcome.removed += 1
                for name in list(dirs):
                    path = here / name
                    if path in links:
                        dirs.remove(name)
                    elif path in keep_dirs:
                        continue
                    elif path.is_symlink():
                        path.unlink()
                        dirs.remove(name)
                        self.outcome.removed += 1
                    else:
                        shutil.rmtree(path)
                        dirs.remove(name)
                        self.outcome.removed += 1


def write_tablespace_map(path: Path, spaces: list[Space]) -> None:
    """The backup's tablespace_map, pointing where the tablespaces were restored (PostgreSQL links them from it
    at start): ``<oid> <path>`` a line, newlines and backslashes escaped as PostgreSQL 15 does."""
    lines = []
    for space in spaces:
        escaped = "".join("\\" + c if c in "\n\r\\" else c for c in str(space.location))
        lines.append(f"{space.oid} {escaped}\n")
    path.write_text("".join(lines))
    os.chmod(path, 0o600)


def restore(source: BackupSource, data: Path, spaces: list[Space], workers: int, delta: bool = False) -> Outcome:
    placement = Placement(data, {space.oid: space for space in spaces})
    outcome = Restorer(source, placement, workers, delta).run()
    if (data / "tablespace_map").exists():
        write_tablespace_map(data / "tablespace_map", spaces)
    for stale in ("standby.signal", "recovery.signal", "postmaster.pid", "postmaster.opts"):
        (data / stale).unlink(missing_ok=True)
    (data / "pg_wal" / "archive_status").mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)
    return outcome
