"""Point-in-time recovery: which archived binlogs a dump needs, and replaying them.

Replay starts at the dump's exact binlog position (never at a file boundary)
and runs every file through ONE mysqlbinlog process piped into ONE client
connection, so temporary tables and open transactions survive file rotations.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from backupd.driver import LogReach, RestoreTarget
from backupd.errors import ArchiveGap, DriverError, UsageError
from backupd.gaps import past_gap
from backupd.logarchive import LogArchive, LogObject
from backupd.manifest import Manifest
from backupd.timeutil import UTC, format_timestamp
from drivers.mysql import binlog
from backupd.tool import DEVNULL, Tool
from drivers.mysql.client import ContentRejected, check_content, tool_path
from drivers.mysql.load import client_argv

PARTIAL = ".partial"


@dataclass(frozen=True)
class ArchivedFile:
    name: str  # the binlog file name, e.g. mysql-bin.000003
    object: str  # the LogArchive name, e.g. 1/mysql-bin.000003 or 1/mysql-bin.000004.partial
    partial: bool
    size: int | None
    modified: dt.datetime | None = None  # when it arrived in storage


def archived_files(archive: LogArchive, server: str) -> dict[int, ArchivedFile]:
    """{index: file} for one server; a complete object wins over a partial one."""
    return files_of(archive.list(f"{server}/"), server)


def files_of(objects: Iterable[LogObject], server: str) -> dict[int, ArchivedFile]:
    """``archived_files`` of listed objects (those of other servers left out)."""
    files: dict[int, ArchivedFile] = {}
    for obj in objects:
        if not obj.name.startswith(f"{server}/"):
            continue
        rest = obj.name[len(server) + 1:]
        partial = rest.endswith(PARTIAL)
        name = rest[: -len(PARTIAL)] if partial else rest
        try:
            _, index = binlog.split_name(name)
        except binlog.BinlogFormatError:
            continue
        if index in files and not files[index].partial:
            continue
        files[index] = ArchivedFile(name, obj.name, partial, obj.raw_size, obj.modified)
    return files


def backup_binlog(manifest: Manifest) -> dict | None:
    return manifest.metadata.get("binlog") if manifest.driver == "mysql" else None


@dataclass
class Chain:
    """The contiguous archived files from the dump's file onwards, and what breaks it."""

    files: list[ArchivedFile]
    missing: list[str]  # file names absent between archived ones (gaps)


def chain_from(files: dict[int, ArchivedFile], first: str) -> Chain:
    base, start = binlog.split_name(first)
    width = len(first) - len(base) - 1
    newest = max(files, default=start - 1)
    run: list[ArchivedFile] = []
    missing: list[str] = []
    broken = False
    for index in range(start, newest + 1):
        item = files.get(index)
        usable = item is not None and (not item.partial or index == newest)
        if not usable:
            missing.append(binlog.file_name(base, index, width))
            broken = True
        elif not broken and item is not None:
            run.append(item)
    return Chain(run, missing)


def reach(archive: LogArchive, manifest: Manifest) -> LogReach | None:
    """How far replay from this backup goes: the last archived file before the first missing one."""
    info = backup_binlog(manifest)
    if not info:
        return None
    server = manifest.metadata.get("server", "")
    return _reach_of(chain_from(archived_files(archive, server), info["file"]), server, info["file"])


def extend(manifest: Manifest, recorded: LogReach, checkpoint: str, tail: Iterable[LogObject]) -> LogReach | None:
    """``recorded`` (unbroken, as a full listing found it) carried over the files named from ``checkpoint`` on:
    the consecutively numbered successors of its last file, to the first one missing. None when the reach
    did not end at the checkpoint (another server's or a later file) or the tail names files otherwise."""
    server = str(manifest.metadata.get("server", ""))
    last, prefix = recorded.last_log, f"{server}/"
    if not last or not last.startswith(prefix) or not checkpoint.startswith(prefix):
        return None
    name = last[len(prefix):].removesuffix(PARTIAL)
    try:
        base, index = binlog.split_name(name)
        checkpoint_base, checkpoint_index = binlog.split_name(checkpoint[len(prefix):].removesuffix(PARTIAL))
        if checkpoint_base != base or checkpoint_index > index:
            return None
    except binlog.BinlogFormatError:
        return None
    files = {index: ArchivedFile(name, last, False, None, recorded.until)}  # usable as recorded
    for number, item in files_of(tail, server).items():
        if binlog.split_name(item.name)[0] != base:
            return None
        if number > index:
            files[number] = item
        elif number == index:  # the same file, archived again since (a partial one growing)
            files[number] = ArchivedFile(name, item.object, False, item.size, item.modified)
    return _reach_of(chain_from(files, name), server, name)


def _reach_of(chain: Chain, server: str, first_file: str) -> LogReach:
    problems = [f"missing binlog {server}/{name}" for name in chain.missing]
    first = f"{server}/{chain.missing[0]}" if chain.missing else None
    if not chain.files and not chain.missing:
        problems.append(f"missing binlog {server}/{first_file} (the backup's starting file)")
        first = f"{server}/{first_file}"
    last = chain.files[-1] if chain.files else None
    return LogReach(last_log=last.object if last else None, until=last.modified if last else None,
                    first_missing=first, missing=tuple(problems))


def last_event_time(path: Path) -> dt.datetime | None:
    """When the last event of a binlog file was written (binlog time has one-second resolution)."""
    newest = None
    for event in binlog.iter_events(path):
        if event.timestamp:
            newest = event.timestamp
    return dt.datetime.fromtimestamp(newest, UTC) if newest else None


def stop_datetime(target: dt.datetime) -> str:
    """mysqlbinlog's --stop-datetime, read in TZ=UTC; binlog time has 1-second resolution.

    Events stamped in the target's own second may lie after it, so replay stops
    before that second: every replayed event provably happened before the target.
    """
    return target.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class ReplayPlan:
    files: list[ArchivedFile]
    start_position: int
    stop_args: list[str]
    describe: str


def parse_position(text: str) -> tuple[str, int]:
    name, sep, pos = text.rpartition(":")
    if not sep or not pos.isdigit():
        raise UsageError(f"--target-position: expected FILE:POS, e.g. mysql-bin.000042:1234 (got {text!r})")
    try:
        binlog.split_name(name)
    except binlog.BinlogFormatError:
        raise UsageError(f"--target-position: {name!r} is not a binlog file name") from None
    return name, int(pos)


def plan_replay(chain: Chain, manifest: Manifest, target: RestoreTarget | None, fetched: dict[str, Path] | None = None,
                to_gap: bool = False) -> ReplayPlan:
    """Files and mysqlbinlog options; GTID targets need ``fetched`` local copies to locate.

    Replay applies the whole server's binlog: ``mysqlbinlog --database`` filters
    statements by their default database, so it would silently drop a
    ``DROP TABLE db.t`` issued from another one. A job that dumps only some
    databases therefore needs the others present on the target (check warns).
    """
    if chain.missing and chain.files and _past_gap(chain, target, fetched):
        server = manifest.metadata.get("server", "")
        reachable = _reachable(chain, fetched)
        where = (f"reachable from backup {manifest.backup_id} up to {format_timestamp(reachable)}"
                 if reachable else f"reachable up to the end of {chain.files[-1].name}")
        if not to_gap:
            what = f"--target-{target.kind} {target.value}" if target is not None else "the newest state"
            raise past_gap(what, "binlogs", f"missing binlog {server}/{chain.missing[0]}", where)
        plan = _plan(chain, manifest, None, fetched, allow_gap=True)
        plan.describe = (f"--to-gap: replay stops before missing binlog {server}/{chain.missing[0]}, at the end of "
                         f"{plan.files[-1].name} ({where}); later transactions are not restored")
        return plan
    return _plan(chain, manifest, target, fetched)


def _past_gap(chain: Chain, target: RestoreTarget | None, fetched: dict[str, Path] | None) -> bool:
    """Whether reaching ``target`` (None: the newest state) needs a file past the chain's first gap."""
    if target is None:
        return True
    if target.kind == "time":
        reachable = _reachable(chain, fetched)
        return reachable is None or (target.time is not None and target.time > reachable)
    if target.kind == "position":
        return parse_position(target.value)[0] in chain.missing
    return False  # a GTID is located in the fetched files: not found there, the plan says so


def _reachable(chain: Chain, fetched: dict[str, Path] | None) -> dt.datetime | None:
    """The last event's time before the gap (from the fetched copy), else when that file arrived (an upper bound)."""
    last = chain.files[-1]
    if fetched is not None and last.name in fetched:
        return last_event_time(fetched[last.name])
    return last.modified


def _plan(chain: Chain, manifest: Manifest, target: RestoreTarget | None, fetched: dict[str, Path] | None,
          allow_gap: bool = False) -> ReplayPlan:
    info = backup_binlog(manifest) or {}
    server = manifest.metadata.get("server", "")
    start = int(info["position"])
    files = list(chain.files)
    if not files:
        raise DriverError(f"missing binlog {server}/{info['file']} (where the backup's position is)",
                          hint="is archive_logs on and the archiver running?")
    gap_note = f"; missing binlog {server}/{chain.missing[0]} after it" if chain.missing else ""
    if target is None:
        if chain.missing and not allow_gap:
            raise ArchiveGap(f"missing binlog {server}/{chain.missing[0]}: cannot replay to the newest state",
                             hint="restore to a --target-position before the gap, or pass --to-gap")
        return ReplayPlan(files, start, [], f"replay to the end of {files[-1].object}")
    if target.kind == "time":
        assert target.time is not None
        return ReplayPlan(files, start, [f"--stop-datetime={stop_datetime(target.time)}"],
                          f"replay until {format_timestamp(target.time)} (events stamped before "
                          f"{stop_datetime(target.time)} UTC){gap_note}")
    if target.kind == "position":
        name, pos = parse_position(target.value)
        names = [f.name for f in files]
        if name not in names:
            if name in chain.missing:
                raise DriverError(f"missing binlog {server}/{name}: cannot replay to {target.value}")
            raise DriverError(f"--target-position {target.value}: {name} is not among the archived binlogs "
                              f"{names[0]}..{names[-1]} of server {server}")
        if name == info["file"] and pos < start:
            raise UsageError(f"--target-position {target.value} is before the backup's position {info['file']}:{start}")
        files = files[: names.index(name) + 1]
        return ReplayPlan(files, start, [f"--stop-position={pos}"], f"replay to {name}:{pos}")
    if target.kind == "gtid":
        binlog.parse_gtid(target.value)
        if fetched is None:
            return ReplayPlan(files, start, [], f"replay through GTID {target.value} (located after fetching)")
        for i, item in enumerate(files):
            path = fetched[item.name]
            stop = _gtid_end(path, target.value, start if i == 0 else 4)
            if stop is not None:
                return ReplayPlan(files[: i + 1], start, [f"--stop-position={stop}"],
                                  f"replay through GTID {target.value} (ends at {item.name}:{stop})")
        raise DriverError(f"GTID {target.value} is not in the archived binlogs {files[0].name}..{files[-1].name} "
                          f"after the backup's position{gap_note}")
    raise UsageError(f"the mysql driver cannot restore to a --target-{target.kind} (use time, position or gtid)")


def _gtid_end(path: Path, gtid: str, start: int) -> int | None:
    """Where the transaction of ``gtid`` ends: the next transaction's start, or the file's end."""
    found = False
    for event in binlog.iter_events(path):
        if event.offset < start:
            continue
        if found and (event.gtid or event.type in binlog.CLOSING_EVENTS):
            return event.offset
        if event.gtid == gtid:
            found = True
    return path.stat().st_size if found else None


def replay(plan: ReplayPlan, fetched: dict[str, Path], defaults_file: str, timeout: float | None = None) -> None:
    """ONE mysqlbinlog over every file, piped into ONE client connection."""
    paths: Sequence[str] = [str(fetched[f.name]) for f in plan.files]
    argv = [tool_path("binlog"), f"--start-position={plan.start_position}", *plan.stop_args, *paths]
    env = {**os.environ, "TZ": "UTC"}
    with Tool(argv, env=env) as reader:
        with Tool(client_argv(defaults_file), stdin=reader.stdout, stdout=DEVNULL) as client:
            reader.stdout.close()  # the client holds the pipe now; mysqlbinlog sees EPIPE if it dies
            try:
                check_content(client, "applying binlogs", timeout)
            except ContentRejected as exc:
                if "gone away" in str(exc):
                    exc.hint = "raise max_allowed_packet on the target server (large row events need it)"
                raise
        reader.check(timeout, "reading binlogs")
