"""Taking one backup: lock, driver streams through the pipeline, manifest last.

The run's lock, log context and metrics are its ``JobRun``'s (``backupd.jobrun``);
the caller records the outcome in the audit trail."""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable

import structlog

from backupd import __version__, plugins
from backupd.chain import BACKUP_TYPES, FULL, INCREMENTAL_METHODS, article, choose_parent, supports_types
from backupd.context import JobContext
from backupd.driver import IncrementalBackup
from backupd.errors import DriverError, UsageError
from backupd.jobrun import JobRun
from backupd.manifest import Manifest, ObjectEntry
from backupd.pipeline import CountingReader
from backupd.runstate import RunRecord, record_run
from backupd.storage import Readable
from backupd.timeutil import utcnow

log = structlog.get_logger(__name__)


def run_backup(
    ctx: JobContext,
    method: str | None = None,
    backup_type: str | None = None,
    *,
    wait: float = 0.0,
    cancel: threading.Event | None = None,
    on_id: Callable[[str], None] | None = None,
    run: JobRun | None = None,
) -> Manifest:
    """One backup of the job, as ``run`` (a run of its own by default); ``run.backup_id`` names the new
    backup as soon as it is chosen, and ``on_id`` hears it then.

    ``backup_type`` "diff" or "incr" (DESIGN.md "Backup types") needs a driver with the
    incremental capability and method physical; None or "full" takes a full. A diff or incr
    with no full in the repository takes a full (with a warning); one whose parent's chain is
    broken is refused before it starts, naming the backup that is missing.
    """
    run = JobRun.of(ctx, "backup", run)
    driver = ctx.driver
    method = method or driver.default_method
    if method not in driver.methods:
        raise UsageError(f"driver {ctx.job.driver} has no method {method!r} (has: {', '.join(driver.methods)})")
    requested = backup_type or FULL
    incremental = _incremental(ctx, method, requested)
    repo = ctx.repository
    recipients = ctx.recipients
    with run.lock(ctx.state_dir, wait=wait, cancel=cancel):
        try:
            _ = repo.signing_key  # an unreadable signing.key_file fails the run before the first byte
            _remove_abandoned(ctx)
            chain = _parent_chain(ctx, method, requested) if incremental is not None else []
            if chain and incremental is not None and (problem := incremental.parent_problem(chain)):
                log.warning(f"taking a full backup instead of {article(requested)} {requested}: {problem}",
                            job=ctx.name)
                chain = []
            kind = requested if chain else FULL
            started = utcnow()
            backup_id = run.backup_id = repo.new_backup_id(started)
            if on_id is not None:
                on_id(backup_id)
        except BaseException as exc:  # storage down before the first byte: still a failed attempt
            run.recorder.backup_failed(ctx.name, method, requested)
            _record_run(ctx, RunRecord("failure", utcnow(), None, run.describe(exc)))
            raise
        entries: list[ObjectEntry] = []
        names: set[str] = set()
        names_lock = threading.Lock()  # a driver may store a side stream from another thread
        with run.bound(backup_id=backup_id, method=method, type=kind):
            log.info("backup started", parent=chain[-1].backup_id if chain else None)

            def sink(name: str, source: Readable) -> ObjectEntry:
                with names_lock:
                    if name in names:
                        raise DriverError(f"driver produced two streams named {name!r}")
                    names.add(name)
                entry = repo.write_stream(
                    backup_id, name, CountingReader(source, name), recipients, ctx.job.compression_level, cancel,
                    priority=driver.cpu_priority,
                )
                entries.append(entry)
                return entry

            try:
                if incremental is not None and chain:
                    result = incremental.backup_incremental(method, sink, kind, chain)
                else:
                    result = driver.backup(method, sink)
                if not entries:
                    raise DriverError(f"driver {ctx.job.driver} produced no data streams")
                manifest = Manifest(
                    backup_id=backup_id,
                    job=ctx.name,
                    driver=ctx.job.driver,
                    method=method,
                    started_at=started,
                    finished_at=utcnow(),
                    objects=sorted(entries, key=lambda entry: entry.name),
                    compression={"algorithm": "zstd", "level": ctx.job.compression_level},
                    encryption={"format": "age-v1", "recipients": [str(r) for r in recipients]},
                    metadata=typed_metadata(kind, chain[-1].backup_id if chain else None,
                                            result.manifest_metadata()),
                    row_counts=result.row_counts,
                    tool_versions={"backupd": __version__, **result.tool_versions},
                    host=socket.gethostname(),
                )
                repo.commit(manifest)
            except BaseException as exc:
                log.error("backup failed; removing its objects", objects=len(entries))
                _discard(ctx, backup_id)
                run.recorder.backup_failed(ctx.name, method, requested)
                _record_run(ctx, RunRecord("failure", utcnow(), backup_id, run.describe(exc)))
                raise
            try:
                driver.committed(manifest)
            except Exception as exc:  # the backup is committed; what the driver keeps about it is extra
                log.warning("driver could not keep its local state of the backup", error=str(exc))
            _record_run(ctx, RunRecord("success", utcnow(), backup_id))
            run.recorder.backup_succeeded(manifest)
            log.info("backup finished", raw=manifest.raw_size, stored=manifest.stored_size,
                     seconds=round(manifest.duration_seconds, 3))
            return manifest


def typed_metadata(backup_type: str, parent: str | None, metadata: dict[str, Any]) -> dict[str, Any]:
    """The manifest's metadata: ``type`` and ``parent`` first, set by the core alone, then the driver's."""
    return {"type": backup_type, "parent": parent,
            **{key: value for key, value in metadata.items() if key not in ("type", "parent")}}


def _incremental(ctx: JobContext, method: str, requested: str) -> IncrementalBackup | None:
    """The driver as an IncrementalBackup for a diff or incr of ``method``; None for a full;
    UsageError (exit 2) when the job cannot take one."""
    if requested not in BACKUP_TYPES:
        raise UsageError(f"unknown backup type {requested!r} (one of: {', '.join(BACKUP_TYPES)})")
    if requested == FULL:
        return None
    driver = ctx.driver
    capabilities = plugins.driver_descriptor(ctx.job.driver).capabilities
    if not isinstance(driver, IncrementalBackup) or not supports_types(capabilities, method):
        raise UsageError(f"job {ctx.name} cannot take {article(requested)} {requested} backup: --type diff|incr "
                         f"needs method {' or '.join(INCREMENTAL_METHODS)} on a driver with incremental "
                         f"backups (driver {ctx.job.driver}, method {method})")
    return driver


def _parent_chain(ctx: JobContext, method: str, requested: str) -> list[Manifest]:
    """The chain the new diff or incr is taken against, full first, its parent last; [] when the
    repository holds no full of ``method`` (a full is taken instead). BrokenChain names a missing parent."""
    parent = choose_parent(ctx.repository.manifests(), requested, method)
    if parent is None:
        log.warning(f"no full {method} backup of job {ctx.name} in the repository: taking a full backup "
                    f"instead of a {requested}", job=ctx.name)
        return []
    return ctx.repository.chain(parent)


def _record_run(ctx: JobContext, record: RunRecord) -> None:
    """Retention pauses after a failed run until a backup succeeds (backupd.runstate)."""
    record_run(ctx.storage, ctx.state_dir, ctx.name, record, ctx.recipients)


def _discard(ctx: JobContext, backup_id: str) -> None:
    try:
        ctx.repository.delete_partial(backup_id)
        ctx.repository.release_id(backup_id)
    except Exception as exc:  # the original failure matters more; prune/next run cleans up
        log.warning("could not remove objects of the failed backup", backup_id=backup_id, error=str(exc))


def _remove_abandoned(ctx: JobContext) -> None:
    """Objects of runs that died before their manifest (SIGKILL, power loss): we hold the job lock,
    so no live run of this job is writing them."""
    partial, leftovers = ctx.repository.abandoned(remove=True)
    if partial or leftovers:
        log.info("removed what dead runs left", partial_backups=partial, temporary=len(leftovers))
