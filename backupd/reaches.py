"""The PITR windows ``list`` shows, at the cost of what was archived since the last full check (issue 22).

A full listing of a log archive costs what the archive holds (a million WAL segments: a thousand
requests on S3). The commands that make one anyway record what it showed in the index's log summary
(``record``; ``backupd.logsummary``); ``list`` then reads it with the index and lists only the logs
from its checkpoint on (``for_list``):

- a reach recorded broken stays broken (a gap filled since shows at the next full check);
- an unbroken one is carried over the logs archived since by the driver (``Driver.extend_reach``);
- a backup committed since has none recorded: its reach is worked out from a listing from its own
  first log on (mostly the tail itself);
- no summary, or a driver that cannot decide from the tail: the whole archive is listed, as before;
  without a summary, what that finds becomes one where this host may write the index (a summary the
  driver cannot carry is replaced by the next full check, not by every ``list``).

So ``list`` shows the windows as of the last full check plus what was archived since; ``verify``
is what proves a window.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import structlog

from backupd.errors import StorageError
from backupd.index import Index
from backupd.logarchive import LogObject
from backupd.logsummary import LogSummary
from backupd.manifest import Manifest, PitrStart

if TYPE_CHECKING:
    from backupd.context import JobContext
    from backupd.driver import LogReach

log = structlog.get_logger(__name__)


def _kind(manifest: Manifest) -> str | None:
    start = PitrStart.from_manifest(manifest)
    return start.log_kind if start is not None and start.log_kind else None


def record(ctx: JobContext, manifests: list[Manifest], reaches: dict[str, LogReach | None],
           listings: dict[str, list[LogObject]], taken_at: dt.datetime) -> None:
    """Store, per log kind listed whole in ``listings``, its checkpoint and the ``reaches`` computed from it,
    when they cover every backup of the index that records logs of that kind. Nothing is stored where this
    host cannot write the index (storage without conditional writes; trusted keys and no signing key)."""
    repo = ctx.repository
    if repo.trusted and repo.signing_key is None:
        return
    index = repo.index()
    if index.version is None:  # rebuilt and not stored: this storage or host does not write it
        return
    summaries: dict[str, LogSummary] = {}
    for kind, listed in listings.items():
        if "\0" in kind or not listed:  # a memo beside the listings (``LogArchive.newest_stored``)
            continue
        computed = {m.backup_id for m in manifests if _kind(m) == kind}
        indexed = {entry.backup_id for entry in index.committed if _kind(entry) == kind}
        if not computed or not indexed <= computed:
            continue
        summaries[kind] = LogSummary(max(obj.name for obj in listed), taken_at,
                                     {backup_id: reach for backup_id in indexed
                                      if (reach := reaches.get(backup_id)) is not None})
    if not summaries:
        return

    def change(stored: Index) -> None:
        present = {entry.backup_id for entry in stored.backups}
        for kind, summary in summaries.items():  # a backup pruned meanwhile takes its reach with it
            stored.log_summary[kind] = LogSummary(summary.checkpoint, summary.taken_at,
                                                  {k: v for k, v in summary.reaches.items() if k in present})

    try:
        repo.update_index(change)
    except StorageError as exc:
        log.warning("log summary not recorded in the index", job=ctx.name, error=str(exc))


def for_list(ctx: JobContext, manifests: list[Manifest], *,
             record: bool = True) -> tuple[dict[str, LogReach | None], dict[str, LogSummary]]:
    """Each backup's reach, from the index's log summary and the logs archived since where it can be
    (``extend``), else from a whole listing (recorded, with ``record``, where there was no summary); and the
    summaries used, by kind."""
    summaries = ctx.repository.index().log_summary
    reaches: dict[str, LogReach | None] = {}
    used: dict[str, LogSummary] = {}
    whole: dict[bool, list[Manifest]] = {True: [], False: []}  # to record (no summary yet) or not
    by_kind: dict[str, list[Manifest]] = {}
    for manifest in manifests:
        kind = _kind(manifest)
        if kind is not None:
            by_kind.setdefault(kind, []).append(manifest)
        elif PitrStart.recorded(manifest):  # a log start of no readable kind: the driver says, from it all
            whole[False].append(manifest)
    for kind, group in sorted(by_kind.items()):
        summary = summaries.get(kind)
        extended = extend(ctx, kind, group, summary) if summary is not None else None
        if summary is None or extended is None:
            whole[record and summary is None].extend(group)  # one the driver cannot carry: the next full check
            continue
        reaches.update(extended)
        used[kind] = summary
    for record, group in whole.items():
        if group:
            reaches.update(ctx.log_reaches(group, record=record))
    return reaches, used


def extend(ctx: JobContext, kind: str, group: list[Manifest], summary: LogSummary) -> dict[str, LogReach | None] | None:
    """The reaches of ``group`` (backups recording logs of ``kind``) from ``summary`` and the logs named from
    its checkpoint on; None when the driver cannot decide one from them."""
    from backupd.restore import RepositorySource

    archive = ctx.listed_archive(kind)  # type: ignore[arg-type]
    tail = archive.list_from(summary.checkpoint)
    found: dict[str, LogReach | None] = {}
    fresh: list[Manifest] = []
    for manifest in group:
        recorded = summary.reaches.get(manifest.backup_id)
        if recorded is None:
            fresh.append(manifest)
        elif recorded.broken:
            found[manifest.backup_id] = recorded
        else:
            carried = ctx.driver.extend_reach(manifest, recorded, summary.checkpoint, tail)
            if carried is None:
                log.info("log summary cannot be carried over the newer logs; listing them all", job=ctx.name,
                         kind=kind, backup_id=manifest.backup_id)
                return None
            found[manifest.backup_id] = carried
    if fresh:  # committed since the summary: from their own first log on
        starts = [start.first_log for m in fresh if (start := PitrStart.from_manifest(m)) is not None]
        first = min(starts, default="")
        if not first or len(starts) < len(fresh) or "" in starts:
            return None
        listed = [obj for obj in tail if obj.name >= first] if first >= summary.checkpoint else archive.list_from(first)
        listings: dict[str, list[LogObject]] = {kind: listed}
        for manifest in fresh:
            found[manifest.backup_id] = ctx.driver.log_reach(RepositorySource(ctx.repository, manifest, (), None,
                                                                              listings=listings, summary_ok=True))
    return found
