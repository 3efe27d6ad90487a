"""What of a live data directory a file-engine backup copies: its files and directories, tablespaces
followed through pg_tblspc, minus what PostgreSQL rebuilds or never needs (as pg_basebackup leaves out)."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from backupd.errors import DriverError

#: directories kept empty: their contents are recreated at start or are never needed by recovery
EMPTY_DIRS = frozenset({"pg_wal", "pg_dynshmem", "pg_notify", "pg_replslot", "pg_serial", "pg_snapshots",
                        "pg_stat_tmp", "pg_subtrans"})
SKIP_FILES = frozenset({"postmaster.pid", "postmaster.opts", "backup_label", "tablespace_map", "backup_manifest",
                        "backup_label.old", "tablespace_map.old"})
#: written last, after every data file (its copy must not predate theirs)
CONTROL_FILE = "global/pg_control"
RELATION = re.compile(r"^(\d+)(?:_(fsm|vm|init))?(?:\.\d+)?$")
TEMP_RELATION = re.compile(r"^t\d+_\d+")  #: a session's temporary table: gone at restart


@dataclass(frozen=True)
class Found:
    path: str  #: relative, with tablespace files under pg_tblspc/<oid>/
    source: Path  #: where to read it
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Tablespace:
    oid: str
    name: str
    location: str
    version_dir: str  #: PG_<major>_<catversion>: the part of the location this cluster owns


@dataclass
class Listing:
    files: list[Found]
    dirs: list[str]


def system_identifier(data_dir: Path) -> int:
    """The cluster's identifier as global/pg_control records it (its first 8 bytes, little-endian)."""
    with open(data_dir / CONTROL_FILE, "rb") as handle:
        head = handle.read(8)
    if len(head) != 8:
        raise DriverError(f"{data_dir / CONTROL_FILE}: too short to be a pg_control file")
    return int.from_bytes(head, "little")


def _unlogged(names: list[str]) -> set[str]:
    """Files of unlogged relations (those with an init fork; reset at start) and of temporary ones: never copied."""
    inits = {m.group(1) for name in names if (m := RELATION.match(name)) and m.group(2) == "init"}
    return {name for name in names if (m := RELATION.match(name)) and m.group(1) in inits and m.group(2) != "init"
            or TEMP_RELATION.match(name)}


def _skipped(name: str) -> bool:
    return name in SKIP_FILES or name == "pg_internal.init" or name.startswith("pgsql_tmp")


def _walk(root: Path, prefix: str, listing: Listing, database_dirs: bool) -> None:
    """Every regular file under ``root`` (followed into no symlinked directory)."""
    stack = [(root, prefix)]
    while stack:
        directory, rel = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue  # a database dropped while we walk
        names = [entry.name for entry in entries]
        unlogged = _unlogged(names) if database_dirs else set()
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            if _skipped(entry.name) or entry.name in unlogged:
                continue
            try:
                info = entry.stat(follow_symlinks=True)
            except FileNotFoundError:
                continue  # removed since the listing (a dropped relation): WAL replay removes it too
            if stat.S_ISDIR(info.st_mode):
                if entry.is_symlink():
                    raise DriverError(f"{directory / entry.name}: a symlinked directory inside the data directory "
                                      "(only pg_wal and pg_tblspc/* may be links)")
                listing.dirs.append(path)
                stack.append((Path(entry.path), path))
            elif stat.S_ISREG(info.st_mode):
                listing.files.append(Found(path, Path(entry.path), info.st_size, info.st_mtime_ns))


def scan(data_dir: Path, tablespaces: dict[str, str], version_dir: str) -> tuple[Listing, list[Tablespace]]:
    """Files and directories of the cluster; ``tablespaces`` names them by oid (from pg_tablespace)."""
    listing = Listing([], [])
    spaces = []
    tblspc = data_dir / "pg_tblspc"
    for link in sorted(tblspc.iterdir()) if tblspc.is_dir() else []:
        if not link.name.isdigit():
            continue
        location = os.readlink(link) if link.is_symlink() else str(link)  # in-place tablespaces are directories
        spaces.append(Tablespace(link.name, tablespaces.get(link.name, link.name), location, version_dir))
        own = link / version_dir
        prefix = f"pg_tblspc/{link.name}/{version_dir}"
        listing.dirs.append(prefix)
        if own.is_dir():
            _walk(own, prefix, listing, database_dirs=True)
    listing.dirs.append("pg_tblspc")
    _walk_root(data_dir, listing)
    return listing, spaces


def _walk_root(data_dir: Path, listing: Listing) -> None:
    """The main directory, without pg_tblspc (walked through its links) and with base/ walked as databases."""
    for entry in sorted(os.scandir(data_dir), key=lambda e: e.name):
        name = entry.name
        if name == "pg_tblspc" or _skipped(name):
            continue
        info = entry.stat(follow_symlinks=True)
        if stat.S_ISREG(info.st_mode):
            listing.files.append(Found(name, Path(entry.path), info.st_size, info.st_mtime_ns))
        elif stat.S_ISDIR(info.st_mode):
            listing.dirs.append(name)
            if name in EMPTY_DIRS:
                if name == "pg_wal":
                    listing.dirs.append("pg_wal/archive_status")
                continue
            if entry.is_symlink():
                raise DriverError(f"{entry.path}: a symlinked directory inside the data directory "
                                  "(only pg_wal and pg_tblspc/* may be links)")
            if name == "base":
                for database in sorted(os.scandir(entry.path), key=lambda e: e.name):
                    if database.is_dir(follow_symlinks=False) and not _skipped(database.name):
                        listing.dirs.append(f"base/{database.name}")
                        _walk(Path(database.path), f"base/{database.name}", listing, database_dirs=True)
            else:
                _walk(Path(entry.path), name, listing, database_dirs=False)
