"""Point-in-time planning: which base backup serves a target, the restorable window, recovery settings."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import sys
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from backupd.driver import LogReach, RestoreRequest, RestoreTarget
from backupd.errors import BackupNotFound, ObjectNotFound, UsageError
from backupd.logarchive import LogArchive, LogObject
from backupd.manifest import Manifest, PitrStart
from backupd.timeutil import format_timestamp
from drivers.postgres.cluster import conf_value
from drivers.postgres.walnames import (SEGMENT_RE, Switch, expected_segments, format_lsn, parse_lsn, parse_segment,
                                      segment_name, segno_of_lsn)

RECOVERY_MARK = "# recovery settings written by backupd restore"


@dataclass
class ArchiveView:
    """What the WAL archive holds: segment names by timeline, history files, the newest arrival."""

    segments: dict[str, list[str]] = field(default_factory=dict)  # timeline -> sorted segment names
    histories: list[str] = field(default_factory=list)  # archive names of .history files
    newest: dt.datetime | None = None
    arrivals: dict[str, dt.datetime] = field(default_factory=dict)  # segment name -> when it arrived in storage

    @classmethod
    def scan(cls, archive: LogArchive) -> "ArchiveView":
        """The whole archive (one listing)."""
        return cls.of(archive.list())

    @classmethod
    def of(cls, objects: Iterable[LogObject]) -> "ArchiveView":
        view = cls()
        for obj in sorted(objects, key=lambda o: o.name):
            timeline, _, filename = obj.name.partition("/")
            if filename.endswith(".history"):
                view.histories.append(obj.name)
            elif SEGMENT_RE.match(filename):
                view.segments.setdefault(timeline, []).append(filename)
                if obj.modified:
                    view.arrivals[filename] = obj.modified
                if obj.modified and (view.newest is None or obj.modified > view.newest):
                    view.newest = obj.modified
        for names in view.segments.values():
            names.sort()
        return view

    def all_segments(self) -> list[str]:
        return [name for tl in sorted(self.segments) for name in self.segments[tl]]

    def end_lsn(self, segment_size: int) -> int | None:
        names = self.all_segments()
        if not names:
            return None
        return max(parse_segment(name, segment_size)[1] + 1 for name in names) * segment_size


class FolderWalk:
    """The WAL archive listed one folder (a timeline's logical log: 256 segments of 16 MiB) at a time,
    from where replay from a backup begins, never the whole archive.

    On the backup's timeline, folders are listed from the one holding its first segment until one
    is empty. Later timelines are found as PostgreSQL finds them, by their history files
    (``<tli+1>.history``, then the next); each is listed from the same folder on, passing over the
    empty ones before the folder where its parent ended (the switch lies at or before it), then
    until one is empty. Every folder is listed once per walk, whatever the number of backups.
    A gap of a whole folder reads as the end of the archive here, unless the walk goes ``across_gaps``:
    then at each empty folder one listing, read to its first segment, finds where the timeline resumes
    (``LogArchive.stored_after``), and the walk goes on from there (a continuity check sees the gap).
    """

    def __init__(self, archive: LogArchive) -> None:
        self.archive = archive
        self._folders: dict[tuple[int, int], list[LogObject]] = {}
        self._histories: dict[int, LogObject | None] = {}

    def walk(self, start: str, *, across_gaps: bool = False) -> None:
        """List what replay from the segment ``start`` (a file name) can use (``across_gaps``: to the archive's end)."""
        tli, logid = int(start[:8], 16), int(start[8:16], 16)
        end = self._run(tli, logid, logid, across_gaps)
        while self._history(tli + 1) is not None:
            tli += 1
            end = self._run(tli, logid, end, across_gaps)

    def view(self) -> ArchiveView:
        listed = [obj for objects in self._folders.values() for obj in objects]
        return ArchiveView.of([*listed, *(obj for obj in self._histories.values() if obj is not None)])

    def _run(self, tli: int, logid: int, until: int, across_gaps: bool = False) -> int:
        """List ``tli``'s folders from ``logid``: empty ones up to ``until`` are passed over, then up to the first
        empty one (``across_gaps``: up to the last). The last folder that holds segments (``until`` when none does)."""
        last = until
        while True:
            if self._folder(tli, logid):
                last = max(last, logid)
            elif logid >= until:
                resumes = self._resumes(tli, logid) if across_gaps else None
                if resumes is None:
                    return last
                logid = resumes
                continue
            logid += 1

    def _resumes(self, tli: int, logid: int) -> int | None:
        """The first folder of ``tli`` after ``logid`` that holds a segment; None when none does."""
        timeline = f"{tli:08X}"
        for obj in self.archive.stored_after(timeline, f"{timeline}{logid:08X}"):
            filename = obj.name.partition("/")[2]
            if SEGMENT_RE.match(filename) and filename.startswith(timeline) and int(filename[8:16], 16) > logid:
                return int(filename[8:16], 16)
        return None

    def _folder(self, tli: int, logid: int) -> list[LogObject]:
        if (tli, logid) not in self._folders:
            timeline = f"{tli:08X}"
            self._folders[(tli, logid)] = [obj for obj in self.archive.list(f"{timeline}/{timeline}{logid:08X}")
                                           if SEGMENT_RE.match(obj.name.partition("/")[2])]
        return self._folders[(tli, logid)]

    def _history(self, tli: int) -> LogObject | None:
        if tli not in self._histories:
            name = f"{tli:08X}/{tli:08X}.history"
            try:
                self._histories[tli] = self.archive.stat(name)
            except ObjectNotFound:
                self._histories[tli] = None
        return self._histories[tli]


def first_segment(manifest: Manifest) -> str | None:
    """The segment replay from this physical backup begins with; None when its metadata does not say."""
    meta = manifest.metadata
    if manifest.method != "physical" or not meta.get("pitr"):
        return None
    try:
        segment_size = int(meta.get("wal_segment_size", 16 << 20))
        return segment_name(int(meta["timeline"]), segno_of_lsn(parse_lsn(str(meta["start_lsn"])), segment_size),
                            segment_size)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def newest_with_wal(manifests: Iterable[Manifest]) -> list[Manifest]:
    """The newest physical backup that records where its WAL begins (none: an empty list)."""
    found = [m for m in manifests if first_segment(m) is not None]
    return [max(found, key=lambda m: m.finished_at)] if found else []


def reach(manifest: Manifest, view: ArchiveView, histories: dict[int, list[Switch]] | None) -> LogReach:
    """How far replay from this backup's start can go: the last segment before the first gap.

    With the timeline histories (read with a key), the path follows the switches;
    without them (a listing alone) each timeline from the backup's on is checked on its own.
    """
    meta = manifest.metadata
    segment_size = int(meta.get("wal_segment_size", 16 << 20))
    start_tli = int(meta["timeline"])
    start = segno_of_lsn(parse_lsn(meta["start_lsn"]), segment_size)
    forked = forks(view)
    own = {tl: names for tl, names in view.segments.items() if int(tl, 16) not in forked}
    present = {name for names in own.values() for name in names}
    if histories is not None:
        histories = {tli: switches for tli, switches in histories.items() if tli not in forked}
        last: dict[int, int] = {}
        for name in present:
            tli, segno = parse_segment(name, segment_size)
            last[tli] = max(last.get(tli, segno), segno)
        paths = [expected_segments(start_tli, start, histories, last, segment_size)]
    else:
        paths = []
        for timeline, names in sorted(own.items()):
            tli = int(timeline, 16)
            if tli >= start_tli:
                first = start if tli == start_tli else parse_segment(names[0], segment_size)[1]
                paths.append(expected_segments(tli, first, {}, {tli: parse_segment(names[-1], segment_size)[1]},
                                               segment_size))
    missing = [name for path in paths for name in path if name not in present]
    main = paths[0] if paths else []
    usable = list(itertools.takewhile(lambda name: name in present, main))
    if not missing:
        usable = [name for path in paths for name in path] or usable
    last_log = usable[-1] if usable else None
    return LogReach(last_log=last_log, until=view.arrivals.get(last_log) if last_log else None,
                    first_missing=missing[0] if missing else None,
                    missing=tuple(f"missing WAL segment {name[:8]}/{name}" for name in missing),
                    notes=tuple(f"{why}; restores do not follow it unless --target-timeline {tli}"
                                for tli, why in sorted(forked.items())))


def extend(manifest: Manifest, recorded: LogReach, checkpoint: str, tail: Iterable[LogObject]) -> LogReach | None:
    """``recorded`` (unbroken, as a full listing found it) carried over the segments named from ``checkpoint``
    on: the successors of its last segment on the same timeline, to the first one missing. None when the
    tail holds another timeline or a history file (a switch: ``reach`` decides), or when the reach did not
    end at the checkpoint (the checkpoint's segment is not its last, on its timeline)."""
    last = recorded.last_log
    if last is None or not SEGMENT_RE.match(last):
        return None
    segment_size = int(manifest.metadata.get("wal_segment_size", 16 << 20))
    timeline = last[:8]
    directory, _, file = checkpoint.partition("/")
    if directory != timeline or not SEGMENT_RE.match(file[:24]) or file[:24] > last:
        return None
    tli, segno = parse_segment(last, segment_size)
    present: dict[int, LogObject] = {}
    for obj in tail:
        directory, _, file = obj.name.partition("/")
        if directory != timeline or file.endswith(".history"):
            return None
        if SEGMENT_RE.match(file):
            present[parse_segment(file, segment_size)[1]] = obj
    newest = max(present, default=segno)
    run = list(itertools.takewhile(lambda n: n in present, range(segno + 1, newest + 1)))
    missing = [segment_name(tli, n, segment_size) for n in range(segno + 1, newest + 1) if n not in present]
    if not run:
        return dataclasses.replace(recorded, first_missing=missing[0] if missing else None,
                                   missing=tuple(f"missing WAL segment {timeline}/{name}" for name in missing))
    end = present[run[-1]]
    return LogReach(last_log=segment_name(tli, run[-1], segment_size), until=end.modified,
                    first_missing=missing[0] if missing else None,
                    missing=tuple(f"missing WAL segment {timeline}/{name}" for name in missing), notes=recorded.notes)


def forks(view: ArchiveView) -> dict[int, str]:
    """Timelines that are not the job's cluster's own line: {timeline: why}, from the listing alone.

    A timeline starts at the segment holding its switch point. When the timeline
    below it reaches that segment too and went on being archived after the new
    one stopped, the cluster kept writing the old timeline: the new one was
    promoted elsewhere (a restored copy, a split brain), and so is every timeline
    above it. After a failover it is the other way round: the new timeline is
    the one that goes on, and it is followed.
    """
    # a segment's place on the WAL is its name after the timeline, whatever the segment size
    named = {int(tl, 16): names for tl, names in view.segments.items() if names}
    epoch = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    newest = {tli: max((view.arrivals.get(name, epoch) for name in names), default=epoch)
              for tli, names in named.items()}
    found: dict[int, str] = {}
    for tli in sorted(named):
        lower = [t for t in named if t < tli]
        if not lower:
            continue
        parent = max(lower)
        if parent in found:
            found[tli] = f"timeline {tli} follows timeline {parent}, which is not the cluster's own"
        elif named[parent][-1][8:] >= named[tli][0][8:] and newest[parent] > newest[tli]:
            found[tli] = (f"timeline {tli} starts at segment {named[tli][0]} while timeline {parent} went on to "
                          f"{named[parent][-1]}, archived after it: promoted elsewhere (a restored copy?)")
    return found


def own_timelines(view: ArchiveView) -> dict[str, list[str]]:
    """The archive's segments without the forked timelines."""
    forked = forks(view)
    return {tl: names for tl, names in view.segments.items() if int(tl, 16) not in forked}


def usable_segments(manifest: Manifest, view: ArchiveView, found: LogReach) -> list[str]:
    """The segments of the backup's timeline up to the last usable one (for reading the newest commit)."""
    if found.last_log is None:
        return []
    timeline = found.last_log[:8]
    return [name for name in view.segments.get(timeline, []) if name <= found.last_log]


def is_physical_target(to: str) -> bool:
    return not to.startswith(("postgresql://", "postgres://"))


def backup_end(manifest: Manifest) -> dt.datetime:
    start = PitrStart.from_manifest(manifest)
    return start.since if start is not None else manifest.finished_at


def window(physical: list[Manifest], view: ArchiveView) -> tuple[dt.datetime | None, dt.datetime | None]:
    with_logs = [m for m in physical if m.metadata.get("pitr")]
    start = min((backup_end(m) for m in with_logs), default=None)
    return start, view.newest


def describe_window(physical: list[Manifest], view: ArchiveView) -> str:
    start, end = window(physical, view)
    if start is None or end is None:
        return "no point-in-time window: no physical backup with archived WAL"
    return f"restorable window: {format_timestamp(start)} to {format_timestamp(end)}"


def _committed_after(manifest: Manifest, xid: int) -> bool:
    """Did transaction ``xid`` commit after this backup ended (so replay from it can reach it)?"""
    text = manifest.metadata.get("xid_snapshot_after", "")
    try:
        xmin_s, xmax_s, xip = (text.split(":") + ["", "", ""])[:3]
        xmax = int(xmax_s)
        running = {int(x) for x in xip.split(",") if x}
    except ValueError:
        return True  # unknown: let recovery decide
    return xid >= xmax or xid in running


def choose(manifests: Sequence[Manifest], request: RestoreRequest, backup_id: str | None, job: str,
           archive_view: Callable[[], ArchiveView]) -> Manifest:
    physical = [m for m in manifests if m.method == "physical"]
    if backup_id:
        for manifest in physical:
            if manifest.backup_id == backup_id:
                return manifest
        if any(m.backup_id == backup_id for m in manifests):
            raise UsageError(f"backup {backup_id} is a logical backup; restore it with --to postgresql://HOST/DB")
        raise BackupNotFound(f"backup {backup_id} not found for job {job}")
    if not physical:
        raise BackupNotFound(f"no physical backups for job {job}; a directory --to restores a physical backup",
                             hint=f"run `backupd backup {job} --method physical`, or restore a logical backup "
                                  "with --to postgresql://HOST/DB")
    newest = max(physical, key=lambda m: m.finished_at)
    target = request.target
    if target is None or target.kind == "name":
        return newest
    view = archive_view()
    eligible = _eligible(physical, target, view)
    if not eligible:
        raise UsageError(f"--target-{target.kind} {target.value} is before the oldest backup can reach; "
                         f"{describe_window(physical, view)}")
    return max(eligible, key=lambda m: m.finished_at)


def _eligible(physical: list[Manifest], target: RestoreTarget, view: ArchiveView) -> list[Manifest]:
    if target.kind == "time":
        assert target.time is not None
        if view.newest is None or target.time > view.newest:
            raise UsageError(f"--target-time {format_timestamp(target.time)} is after the newest archived WAL; "
                             f"{describe_window(physical, view)}")
        return [m for m in physical if m.metadata.get("pitr") and backup_end(m) <= target.time]
    if target.kind == "lsn":
        try:
            lsn = parse_lsn(target.value)
        except ValueError as exc:
            raise UsageError(f"--target-lsn: {exc}") from None
        segment_size = int(physical[0].metadata.get("wal_segment_size", 16 << 20))
        end = view.end_lsn(segment_size)
        if end is None or lsn > end:
            raise UsageError(f"--target-lsn {target.value} is after the end of the archived WAL "
                             f"({format_lsn(end) if end else 'none archived'})")
        return [m for m in physical if parse_lsn(m.metadata["stop_lsn"]) <= lsn]
    if target.kind == "xid":
        if not target.value.isdigit():
            raise UsageError(f"--target-xid: not a transaction id (a number): {target.value!r}")
        return [m for m in physical if _committed_after(m, int(target.value))]
    raise UsageError(f"--target-{target.kind} is not supported for PostgreSQL (use time, lsn, xid or name)")


def backupd_executable() -> str:
    candidate = Path(sys.executable).parent / "backupd"
    if candidate.exists():
        return str(candidate)
    return shutil.which("backupd") or "backupd"


def restore_command(job: str, config: Path | None) -> str:
    argv = [backupd_executable()]
    if config is not None:
        argv += ["--config", str(Path(config).absolute())]
    argv += ["wal-fetch", "--job", job, "%f", "%p"]
    return " ".join(_shell_quote(arg) if arg not in ("%f", "%p") else arg for arg in argv)


def _shell_quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "/._-=:" for c in arg):
        return arg
    return "'" + arg.replace("'", "'\"'\"'") + "'"


def target_timeline(view: ArchiveView, asked: str | None) -> str:
    """``recovery_target_timeline``: as asked, else the newest of the cluster's own timelines.

    PostgreSQL's 'latest' would follow any newer timeline in the archive, a promoted
    copy's included; forks are followed only when named.
    """
    if asked:
        return asked
    own = own_timelines(view)
    if not forks(view) or not own:
        return "latest"
    return str(max(int(tl, 16) for tl in own))


def recovery_settings(request: RestoreRequest, command: str) -> dict[str, object]:
    settings: dict[str, object] = {"restore_command": command,
                                   "recovery_target_timeline": request.target_timeline or "latest"}
    target = request.target
    if target is not None:
        value = pg_timestamp(target.time) if target.kind == "time" and target.time else target.value
        settings[f"recovery_target_{target.kind}"] = value
        settings["recovery_target_action"] = request.target_action or "promote"
    return settings


def pg_timestamp(moment: dt.datetime) -> str:
    """PostgreSQL's timestamptz input form (it rejects RFC 3339's T and Z)."""
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f+00")


def write_recovery(data_dir: Path, settings: dict[str, object], backup_id: str) -> None:
    write_settings(data_dir, settings, f"{RECOVERY_MARK} (backup {backup_id})")
    (data_dir / "recovery.signal").write_text("")


def write_settings(data_dir: Path, settings: dict[str, object], comment: str) -> None:
    """Append settings to postgresql.auto.conf (the last value of a setting wins), under a comment."""
    lines = [f"\n# {comment.removeprefix('# ')}"]
    lines += [f"{key} = {conf_value(value)}" for key, value in settings.items()]
    with open(data_dir / "postgresql.auto.conf", "a") as handle:
        handle.write("\n".join(lines) + "\n")


def target_text(request: RestoreRequest) -> str:
    target = request.target
    along = f" along timeline {request.target_timeline}" if request.target_timeline not in (None, "latest") else ""
    if target is None:
        return f"no target: replay to the end of the archived WAL{along}, then promote"
    value = format_timestamp(target.time) if target.kind == "time" and target.time else target.value
    return f"target {target.kind} {value}{along}, then {request.target_action or 'promote'}"
