"""Applying retention to one job: read the repository, plan (backupd.retention), delete.

Order of deletion, so that a crash at any point leaves a valid repository that
the next prune finishes:

0. (while planning) backups that storage holds under an Object Lock
   retention are kept, with the date, so none is left half-deleted;
1. a journal, ``<job>/state/prune.json``, naming the backups about to go;
2. per backup, its manifest first (from then on it is no longer listed), then
   its objects; a backup whose manifest is gone but whose objects remain is
   recognised by the journal next time and finished, whatever its age;
3. abandoned partial directories (no manifest, older than the job timeout);
4. logs, oldest first, so an interrupted run never leaves a hole in the middle
   of the archive;
5. the journal is removed.

An object storage still refuses to delete (``ObjectLocked``) is reported in
``PruneResult.locked`` and its decision turned into "keep: locked until ...";
the rest is pruned and the run succeeds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import structlog

from backupd import reaches as recorded_reaches
from backupd.context import JobContext
from backupd.errors import BackupdError, BackupNotFound, IntegrityError, ObjectLocked, ObjectNotFound, UntrustedObject
from backupd.index import Index, IndexedBackup, newest_logs
from backupd.jobrun import JobRun
from backupd.locks import lock_free
from backupd.logarchive import LogArchive
from backupd.manifest import Manifest, PitrStart
from backupd.pins import Pins
from backupd.repository import LOG_KINDS, Layout
from backupd.retention import (BackupItem, Decision, LogItem, PartialItem, PitrPoint, Plan, deletable_below,
                               locked_reason, plan)
from backupd.runstate import UnreadableRecord, last_run, pause_reason
from backupd.timeutil import backup_id_time, format_timestamp, utcnow

log = structlog.get_logger(__name__)


class PruneRefused(BackupdError):
    """Retention must not run now (the job's newest backup run failed)."""


@dataclass
class PruneResult:
    job: str
    plan: Plan
    dry_run: bool
    deleted_backups: list[str] = field(default_factory=list)
    deleted_partials: list[str] = field(default_factory=list)
    deleted_logs: list[str] = field(default_factory=list)
    deleted_objects: int = 0
    #: Keys storage refused to delete because an Object Lock retention still holds them.
    locked: list[str] = field(default_factory=list)
    #: Until when each of ``locked`` is held, where storage said (RFC 3339; legal hold: None).
    locked_until: dict[str, str | None] = field(default_factory=dict)
    #: Where a kept backup's PITR window ends at a gap in the archived logs (dry runs: the operator's view).
    pitr_breaks: list[str] = field(default_factory=list)
    #: What runs that died before their manifest left: partial backup ids and temporary objects (removed,
    #: or in a dry run to be removed), whatever the policy, once no live run holds the job's lock.
    abandoned: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    #: Set when the job has no retention policy: only what dead runs left is removed.
    no_policy: bool = False

    def add_locked(self, key: str, exc: ObjectLocked) -> None:
        self.locked.append(key)
        until = exc.until if exc.until is not None and exc.until.year != dt.MAXYEAR else None
        self.locked_until[key] = format_timestamp(until) if until else None

    def to_dict(self) -> dict[str, Any]:
        p = self.plan
        return {
            "job": self.job,
            "dry_run": self.dry_run,
            "paused": p.paused,
            "window_start": format_timestamp(p.window_start) if p.window_start else None,
            "restorable_from": format_timestamp(p.restorable_from) if p.restorable_from else None,
            "warnings": p.warnings,
            "untrusted": p.untrusted,
            "logs_kept_from": p.logs_kept_from,
            "decisions": [
                {"kind": d.kind, "name": d.name, "time": format_timestamp(d.time) if d.time else None,
                 "action": d.verdict, "reasons": d.reasons}
                for d in p.decisions()
            ],
            "deleted": {"backups": self.deleted_backups, "partials": self.deleted_partials,
                        "logs": self.deleted_logs, "objects": self.deleted_objects},
            "locked": self.locked,
            "locked_until": self.locked_until,
            "pitr_breaks": self.pitr_breaks,
            "abandoned": {"partial_backups": self.abandoned, "temporary": self.leftovers},
            "no_policy": self.no_policy,
        }


def pitr_breaks(ctx: JobContext, manifests: list[Manifest]) -> list[str]:
    """One line per backup whose PITR window ends at a gap in the archived logs (as ``list`` shows them: from
    the index's log summary and the logs archived since, ``backupd.reaches``)."""
    lines = []
    for backup_id, reach in sorted(recorded_reaches.for_list(ctx, manifests, record=False)[0].items()):
        if reach is not None and reach.broken:
            until = format_timestamp(reach.until) if reach.until else "its start"
            lines.append(f"backup {backup_id}: the PITR window ends at {until}: {reach.missing[0]}")
    return lines


def journal_key(job: str) -> str:
    return Layout(job).journal_key()


def run_prune(ctx: JobContext, *, dry_run: bool = False, now: dt.datetime | None = None,
              run: JobRun | None = None) -> PruneResult:
    """Remove what dead runs left, then plan and (unless ``dry_run``) apply the job's retention policy.

    Without a policy only the leftovers of dead runs go. Raises PruneRefused
    (exit 1) when the newest backup run failed, LockHeld when the job is running.
    """
    run = JobRun.of(ctx, "prune", run)
    policy = ctx.job.retention
    now = now or utcnow()
    lock = contextlib.nullcontext() if dry_run else run.lock(ctx.state_dir)
    with lock, run.bound(stage="prune"):
        # no live run of the job (we hold its lock, or in a dry run nobody does): its partials are debris
        idle = not dry_run or lock_free(ctx.state_dir, ctx.name)
        scanned = ctx.repository.scan()  # the one listing of backups/: partial leftovers, and commits the index lacks
        abandoned, leftovers = ctx.repository.abandoned(remove=not dry_run, partial=scanned[1]) if idle else ([], [])
        if abandoned and not dry_run:
            ctx.storage.delete(journal_key(ctx.name))  # an interrupted prune's partials went with them
        if abandoned or leftovers:
            log.info("what dead runs left" + (" (dry run)" if dry_run else " removed"),
                     partial_backups=abandoned, temporary=len(leftovers))
        if policy.is_empty():
            reconcile(ctx, scanned[0], write=not dry_run)
            result = PruneResult(ctx.name, Plan(backups=[], partials=[], logs=[]), dry_run,
                                 abandoned=abandoned, leftovers=leftovers, no_policy=True)
            return result
        with ctx.one_listing():  # a log archive listed whole (the plan's, the PITR breaks') is listed once
            the_plan = make_plan(ctx, now, skip_partials=set(abandoned), dry_run=dry_run, scanned=scanned)
            result = PruneResult(ctx.name, the_plan, dry_run, abandoned=abandoned, leftovers=leftovers)
            if dry_run:
                kept_ids = set(the_plan.kept_backups())
                result.pitr_breaks = pitr_breaks(ctx, [m for m, _ in ctx.repository.entries()
                                                       if m.backup_id in kept_ids])
                return result
        if the_plan.paused:
            raise PruneRefused(
                f"job {ctx.name}: not pruning: {the_plan.paused}",
                hint=f"pruning resumes after the next successful backup (`backupd backup {ctx.name}`)",
            )
        _apply(ctx, the_plan, result)
        run.recorder.pruned(ctx.name, result.deleted_objects, len(the_plan.kept_backups()),
                            the_plan.restorable_from.timestamp() if the_plan.restorable_from is not None else None)
        log.info("prune finished", backups=len(result.deleted_backups), partials=len(result.deleted_partials),
                 logs=len(result.deleted_logs), objects=result.deleted_objects, locked=len(result.locked))
        return result


def make_plan(ctx: JobContext, now: dt.datetime, skip_partials: set[str] = frozenset(), *,  # type: ignore[assignment]
              dry_run: bool = False, scanned: tuple[list[str], list[str]] | None = None) -> Plan:
    """Read everything the planner needs: the index (one object), one listing of ``backups/`` for partial
    leftovers (which also tells whether the index missed a commit) unless run_prune made it, the logs the plan may
    delete (``retention.deletable_below``), the pins, the run record."""
    repo = ctx.repository
    committed, partial_ids = scanned or repo.scan()
    partial_ids = [i for i in partial_ids if i not in skip_partials]
    reconcile(ctx, committed, write=not dry_run)
    manifests: list[Manifest] = []
    untrusted: list[str] = []
    for entry, trust in reversed(repo.entries()):
        try:
            repo.require_trusted(entry, trust)
        except UntrustedObject as exc:  # a forged manifest must not steer what is deleted: left out, and kept
            untrusted.append(str(exc))
            continue
        manifests.append(entry)
    pinned = Pins(ctx.storage, ctx.name).ids()
    warnings: list[str] = []
    backups = [backup_item(m, m.backup_id in pinned, warnings) for m in manifests]
    interrupted = set(_read_journal(ctx))
    partials = [PartialItem(i, backup_id_time(i), i in interrupted) for i in partial_ids]
    newest_start = max((b.time for b in backups), default=None)
    try:
        paused = pause_reason(last_run(ctx.storage, ctx.state_dir, ctx.name), newest_start)
    except UnreadableRecord as exc:
        paused = str(exc)

    def planned(backups: list[BackupItem], logs: list[LogItem]) -> Plan:
        return plan(backups, logs, ctx.job.retention, now, ctx.settings.daemon.timezone,
                    partials=partials, timeout=ctx.job.timeout, paused=paused)

    # which backups go does not depend on the logs: decide it first, then list only the logs it can let go
    result = planned(backups, [])
    locks = _locks(ctx, result.deleted_backups())
    if locks:  # plan again, keeping them (and the logs they need) with the lock as the reason
        backups = [replace(b, locked_until=locks.get(b.backup_id)) for b in backups]
        result = planned(backups, [])
    bounds = {kind: deletable_below(result, backups, kind) for kind in LOG_KINDS}
    logs = [item for kind in LOG_KINDS for item in _log_items(ctx, kind, bounds[kind])]
    result = planned(backups, logs)
    result.warnings[:0] = warnings
    result.untrusted = untrusted
    result.logs_kept_from = {kind: bound for kind, bound in bounds.items() if bound}
    if not dry_run and all(bound is None for bound in bounds.values()):  # the whole archive was listed
        newest = newest_logs({kind: [item.name for item in logs if item.kind == kind] for kind in LOG_KINDS})
        if newest != repo.index().logs:
            repo.update_index(lambda index: setattr(index, "logs", newest))
    return result


def reconcile(ctx: JobContext, listed: list[str], *, write: bool) -> None:
    """Make the index agree with the committed backups a listing found: a manifest it lacks (a commit
    whose index update was lost, a backup written by an older backupd) is read and added, an entry
    whose manifest is gone dropped, and so are pending entries of runs that died before their manifest. A dry run only corrects what it reads."""
    repo = ctx.repository
    index = repo.index(fresh=write)  # a write compares with what is stored, not with a dry run's corrections
    known = {b.backup_id for b in index.committed} | set(index.unusable)
    # a real prune holds the job's lock: no run of the job is committing, so a pending entry is dead
    dead_pending = {b.backup_id for b in index.backups if b.pending} - set(listed) if write else set()
    if known == set(listed) and not dead_pending:
        return
    log.warning("the index disagrees with the manifests; correcting it", job=ctx.name,
                missing=len(set(listed) - known), gone=len(known - set(listed)))
    added: list[tuple[str, IndexedBackup | str]] = []
    for backup_id in sorted(set(listed) - known):
        try:
            manifest, status = repo.read_for_index(backup_id)
        except BackupNotFound:
            continue
        except IntegrityError as exc:
            added.append((backup_id, str(exc)))
            continue
        added.append((backup_id, IndexedBackup.of(manifest, *status)))
    gone = (known - set(listed)) | dead_pending

    def change(index: Index) -> None:
        index.drop(gone)
        for backup_id, item in added:
            if isinstance(item, str):
                index.unusable[backup_id] = item
            else:
                index.put(item)

    if write:
        repo.update_index(change)
    else:
        change(index)


def _locks(ctx: JobContext, backup_ids: list[str]) -> dict[str, dt.datetime]:
    """Backups some object of which storage still holds under a retention, with the latest date.

    Checked before the manifest goes: a backup whose objects cannot be deleted
    stays listed and restorable, rather than half-deleted. Only storage that can lock
    objects (``Storage.can_lock``: an S3 bucket with Object Lock) is asked.
    """
    locks: dict[str, dt.datetime] = {}
    if not backup_ids or not ctx.storage.can_lock():
        return locks
    for backup_id in backup_ids:
        for info in list(ctx.storage.list(ctx.repository.backup_prefix(backup_id))):
            try:
                until = ctx.storage.stat(info.key).locked_until
            except ObjectNotFound:
                continue
            if until is not None and (backup_id not in locks or until > locks[backup_id]):
                locks[backup_id] = until
    return locks


def backup_item(manifest: Manifest, pinned: bool, warnings: list[str]) -> BackupItem:
    point = None
    try:
        start = PitrStart.read(manifest)
        if start is not None and not (start.log_kind and start.first_log):
            raise ValueError("no log_kind or first_log")
    except ValueError as exc:
        warnings.append(f"backup {manifest.backup_id}: unreadable metadata.pitr ({exc}); its logs are not located")
    else:
        if start is not None:
            point = PitrPoint(start.log_kind, start.first_log, start.since)
    return BackupItem(manifest.backup_id, manifest.started_at, point, pinned,
                      backup_type=manifest.backup_type, parent=manifest.parent)


def _log_items(ctx: JobContext, kind: str, bound: str | None) -> Iterator[LogItem]:
    """The logs of ``kind`` the plan may delete (``retention.deletable_below``): all of them, none, or those
    before ``bound``, the only ones the listing reads."""
    if bound == "":
        return
    archive = ctx.listed_archive(kind)
    found = archive.list() if bound is None else archive.list_before(bound)
    for obj in found:
        yield LogItem(kind, obj.name, obj.modified)


def _read_journal(ctx: JobContext) -> list[str]:
    try:
        with contextlib.closing(ctx.storage.open(journal_key(ctx.name))) as handle:
            data = json.loads(handle.read())
        return [str(i) for i in data.get("deleting", [])]
    except ObjectNotFound:
        return []
    except (ValueError, AttributeError) as exc:
        log.warning("ignoring an unreadable prune journal", key=journal_key(ctx.name), error=str(exc))
        return []


def _apply(ctx: JobContext, the_plan: Plan, result: PruneResult) -> None:
    repo = ctx.repository
    doomed = the_plan.deleted_backups()
    doomed_partials = the_plan.deleted_partials()
    if doomed or doomed_partials:
        record = {"started_at": format_timestamp(utcnow()), "deleting": doomed + doomed_partials}
        ctx.storage.put(journal_key(ctx.name), io.BytesIO(json.dumps(record).encode() + b"\n"))
    decisions = {(d.kind, d.name): d for d in the_plan.decisions()}
    indexed = repo.index().by_id()
    doomed = [backup_id for backup_id in doomed
              if _still_as_indexed(ctx, indexed.get(backup_id), backup_id, decisions[("backup", backup_id)])]
    entries = {backup_id: indexed.get(backup_id) for backup_id in doomed}
    repo.forget(doomed)  # the index first: a backup is never listed once its manifest may be gone
    for backup_id in doomed:
        try:
            ctx.storage.delete(repo.manifest_key(backup_id))
        except ObjectLocked as exc:  # locked since planning
            entry = entries[backup_id]
            if entry is not None:
                repo.reindex(entry)
            result.add_locked(repo.manifest_key(backup_id), exc)
            _keep_locked(decisions[("backup", backup_id)], exc)
            log.warning("backup is under Object Lock; kept", backup_id=backup_id, error=str(exc))
            continue
        result.deleted_objects += 1 + _delete_objects(ctx, backup_id, result)
        repo.release_id(backup_id)
        result.deleted_backups.append(backup_id)
        log.info("backup pruned", backup_id=backup_id)
    for backup_id in doomed_partials:
        locked = len(result.locked)
        result.deleted_objects += _delete_objects(ctx, backup_id, result)
        if len(result.locked) > locked:
            decision = decisions[("partial", backup_id)]
            decision.keep = True
            decision.reasons.insert(0, "keep: some objects are locked (Object Lock)")
            continue
        repo.release_id(backup_id)
        result.deleted_partials.append(backup_id)
        log.info("partial backup removed", backup_id=backup_id)
    archives: dict[str, LogArchive] = {}
    for decision in the_plan.deleted_logs():
        archive = archives.setdefault(decision.kind, ctx.listed_archive(decision.kind))
        try:
            archive.delete(decision.name)
        except ObjectLocked as exc:
            result.add_locked(archive.key(decision.name), exc)
            _keep_locked(decision, exc)
            continue
        result.deleted_objects += 1
        result.deleted_logs.append(f"{decision.kind}/{decision.name}")
    if doomed or doomed_partials:
        ctx.storage.delete(journal_key(ctx.name))


def _still_as_indexed(ctx: JobContext, entry: IndexedBackup | None, backup_id: str, decision: Decision) -> bool:
    """Whether the manifest about to be deleted is still the one the plan was made from (read by key,
    its signature checked again); if not, the backup is kept, saying why."""
    try:
        if entry is None:
            raise IntegrityError(f"backup {backup_id} is no longer in the index")
        ctx.repository.load_full(entry, strict=True)
    except BackupNotFound:
        return True  # already gone: finish deleting its objects
    except IntegrityError as exc:
        decision.keep = True
        decision.reasons.insert(0, f"keep: not deleted: {exc}")
        log.warning("backup kept: its manifest is not the one planned from", backup_id=backup_id, error=str(exc))
        return False
    return True


def _delete_objects(ctx: JobContext, backup_id: str, result: PruneResult) -> int:
    count = 0
    for info in list(ctx.storage.list(ctx.repository.backup_prefix(backup_id))):
        try:
            ctx.storage.delete(info.key)
        except ObjectLocked as exc:
            result.add_locked(info.key, exc)
            continue
        count += 1
    return count


def _keep_locked(decision: Decision, exc: ObjectLocked) -> None:
    """Turn a delete decision storage refused into a keep, saying why."""
    decision.keep = True
    decision.reasons.insert(0, f"keep: {locked_reason(exc.until)}" if exc.until else "keep: locked (Object Lock)")
