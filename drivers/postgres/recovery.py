"""Planning a physical restore against the WAL archive: how far replay reaches, where it meets a gap,
and what target recovery should run with.

One ``RecoveryPlan`` serves the steps of one restore (choosing the backup, the dry run's plan,
the restore itself, the PITR drill): it lists only the WAL folders replay from the backups it
looks at can use (``pitr.FolderWalk``), each once, when first needed, and checks continuity
over that range.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import BinaryIO, Callable, Sequence

from backupd import age
from backupd.driver import LogReach, RestoreRequest, RestoreTarget
from backupd.errors import BackupdError, DriverError
from backupd.gaps import past_gap
from backupd.logarchive import LogArchive
from backupd.manifest import Manifest
from backupd.timeutil import format_timestamp
from drivers.postgres import pitr, waldump
from drivers.postgres.connection import find_tool
from drivers.postgres.walnames import archive_name, parse_history, parse_lsn, parse_segment


class RecoveryPlan:
    """What the steps of one restore share and decide: the backups chosen among, the WAL archive's
    listing (made once, only when needed), and the recovery target replay can reach."""

    def __init__(self, archive: Callable[[], LogArchive], bin_dir: str | None,
                 manifests: Sequence[Manifest] = ()) -> None:
        self._archive = archive
        self.bin_dir = bin_dir  #: where pg_waldump is looked for first
        self.manifests = list(manifests)
        self._view: pitr.ArchiveView | None = None
        self._walk: pitr.FolderWalk | None = None
        self._walked: dict[str, pitr.ArchiveView] = {}

    @property
    def view(self) -> pitr.ArchiveView:
        """The whole archive (``backupd check``'s look at its timelines), listed once."""
        if self._view is None:
            self._view = pitr.ArchiveView.scan(self._archive())
        return self._view

    def view_for(self, manifests: Sequence[Manifest]) -> pitr.ArchiveView:
        """The archive as replay from these backups can use it: their folders on (the whole archive when
        none records where its WAL begins)."""
        starts = sorted({start for start in map(pitr.first_segment, manifests) if start is not None})
        if not starts:
            return self.view
        key = ",".join(starts)
        if key not in self._walked:
            if self._walk is None:
                self._walk = pitr.FolderWalk(self._archive())
            for start in starts:
                self._walk.walk(start)
            self._walked[key] = self._walk.view()
        return self._walked[key]

    def resolve_target(self, open_log: Callable[[str, str], BinaryIO] | None, manifest: Manifest,
                       request: RestoreRequest) -> tuple[RestoreRequest, dt.datetime | None]:
        """The request recovery should run, and the newest commit when that is not the one given.

        A --target-time after the archive's newest commit would fail the recovery at its end;
        nothing committed in between, so the end of the archive is the state at the target.
        """
        request = dataclasses.replace(request, target_timeline=pitr.target_timeline(
            self.view_for([manifest]), request.target_timeline))
        request = self.within_reach(open_log, manifest, request)
        newest = self._commit_before_target(open_log, manifest, request)
        return (request, None) if newest is None else (dataclasses.replace(request, target=None), newest)

    def gap(self, open_log: Callable[[str, str], BinaryIO] | None, manifest: Manifest
            ) -> tuple[LogReach, dt.datetime | None] | None:
        """The first gap replay from ``manifest`` meets, with the latest time it can reach; None without one.

        The reachable time is the newest commit before the gap (pg_waldump, with a key);
        without a key it is when the last usable segment arrived (an upper bound).
        """
        if manifest.method != "physical" or not manifest.metadata.get("pitr"):
            return None
        view = self.view_for([manifest])
        found = pitr.reach(manifest, view, histories(open_log, view))
        if not found.broken:
            return None
        try:
            newest = self._newest_commit_in(open_log, manifest, pitr.usable_segments(manifest, view, found))
        except BackupdError:
            newest = None  # no key on this host (a dry run elsewhere): the listing's bound
        return found, newest or found.until

    def within_reach(self, open_log: Callable[[str, str], BinaryIO] | None, manifest: Manifest,
                     request: RestoreRequest) -> RestoreRequest:
        """The request unchanged when replay can reach its target; ArchiveGap (exit 1) when a gap is in the way.

        ``--to-gap`` restores up to the gap knowingly: the target (if past it) is dropped.
        """
        found = self.gap(open_log, manifest)
        if found is None:
            return request
        reach, reachable = found
        target = request.target
        where = f"reachable from backup {manifest.backup_id} up to " + (
            format_timestamp(reachable) if reachable else f"segment {reach.last_log or 'none'}")
        if target is None or self._past(target, reach, reachable, manifest):
            if request.to_gap:
                return dataclasses.replace(request, target=None)
            what = f"--target-{target.kind} {target.value}" if target is not None else "the end of the archive"
            raise past_gap(what, "WAL", reach.missing[0], where)
        return request

    @staticmethod
    def _past(target: RestoreTarget, reach: LogReach, reachable: dt.datetime | None, manifest: Manifest) -> bool:
        if target.kind == "time":
            return reachable is None or (target.time is not None and target.time > reachable)
        if target.kind == "lsn":
            segment_size = int(manifest.metadata.get("wal_segment_size", 16 << 20))
            if reach.last_log is None:
                return True
            end = (parse_segment(reach.last_log, segment_size)[1] + 1) * segment_size
            try:
                return parse_lsn(target.value) >= end
            except ValueError:
                return False  # choose() reports the malformed LSN
        return False  # xid, name: PostgreSQL itself fails when replay ends before reaching them

    def gap_note(self, open_log: Callable[[str, str], BinaryIO] | None, manifest: Manifest,
                 request: RestoreRequest) -> list[str]:
        """What the plan says about a gap it restores up to (``--to-gap``)."""
        found = self.gap(open_log, manifest) if request.to_gap else None
        if found is None:
            return []
        reach, reachable = found
        return [f"--to-gap: the archived WAL has a gap at {reach.missing[0]}; recovery stops before it, at "
                f"{format_timestamp(reachable) if reachable else reach.last_log} (later commits are not restored)"]

    def _commit_before_target(self, open_log: Callable[[str, str], BinaryIO] | None, manifest: Manifest,
                              request: RestoreRequest) -> dt.datetime | None:
        """The archive's newest commit time when a --target-time lies after it (recovery would fail), else None."""
        target = request.target
        if target is None or target.kind != "time" or target.time is None:
            return None
        view = self.view_for([manifest])
        if not view.segments:
            return None
        newest = self._newest_commit_in(open_log, manifest, view.segments[max(view.segments)])
        return newest if newest is not None and target.time > newest else None

    def _newest_commit_in(self, open_log: Callable[[str, str], BinaryIO] | None, manifest: Manifest,
                          segments: list[str]) -> dt.datetime | None:
        """The newest commit in the last of ``segments`` (pg_waldump); None without the tool or a commit."""
        if open_log is None or not segments:
            return None
        major = int(manifest.tool_versions.get("postgresql", "0") or 0) // 10000 or None
        try:
            pg_waldump = find_tool("pg_waldump", self.bin_dir, major)
        except DriverError:
            return None  # without it, the target stays as given (PostgreSQL decides)
        return waldump.newest_commit(pg_waldump, segments, lambda filename: open_log("wal", archive_name(filename)))


def histories(open_log: Callable[[str, str], BinaryIO] | None, view: pitr.ArchiveView) -> dict[int, list] | None:
    """Timeline histories by timeline, read from the archive; None without a key (or unreadable)."""
    found = {}
    if open_log is None:
        return None
    try:
        for name in view.histories:
            with open_log("wal", name) as stream:
                found[int(name.split("/")[0], 16)] = parse_history(stream.read().decode())
    except (BackupdError, age.AgeError, ValueError):
        return None  # no key here (integrity checks) or unreadable: per-timeline checks instead
    return found


def after_newest(request: RestoreRequest, newest: dt.datetime | None) -> list[str]:
    """What the plan says when a --target-time lies after the archive's newest commit (``newest``)."""
    if newest is None:
        return []
    asked = request.target.time if request.target is not None else None
    return [f"--target-time {format_timestamp(asked) if asked else '?'} is after the newest commit in the "
            f"archived WAL ({format_timestamp(newest)}): nothing committed in between, so recovery replays "
            "to the end of the archive, the state at the target"]
