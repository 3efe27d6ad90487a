"""Taking one backup: lock, driver streams through the pipeline, manifest last.

The run's lock, log context and metrics are its ``JobRun``'s (``backupd.jobrun``);
the caller records the outcome in the audit trail."""

from __future__ import annotations

import socket
import threading
from typing import Callable

import structlog

from backupd import __version__
from backupd.context import JobContext
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
    *,
    wait: float = 0.0,
    cancel: threading.Event | None = None,
    on_id: Callable[[str], None] | None = None,
    run: JobRun | None = None,
) -> Manifest:
    """One backup of the job, as ``run`` (a run of its own by default); ``run.backup_id`` names the new
    backup as soon as it is chosen, and ``on_id`` hears it then."""
    run = JobRun.of(ctx, "backup", run)
    driver = ctx.driver
    method = method or driver.default_method
    if method not in driver.methods:
        raise UsageError(f"driver {ctx.job.driver} has no method {method!r} (has: {', '.join(driver.methods)})")
    repo = ctx.repository
    recipients = ctx.recipients
    with run.lock(ctx.state_dir, wait=wait):
        try:
            _ = repo.signing_key  # an unreadable signing.key_file fails the run before the first byte
            _remove_abandoned(ctx)
            started = utcnow()
            backup_id = run.backup_id = repo.new_backup_id(started)
            if on_id is not None:
                on_id(backup_id)
        except BaseException as exc:  # storage down before the first byte: still a failed attempt
            run.recorder.backup_failed(ctx.name, method)
            _record_run(ctx, RunRecord("failure", utcnow(), None, run.describe(exc)))
            raise
        entries: list[ObjectEntry] = []
        names: set[str] = set()
        names_lock = threading.Lock()  # a driver may store a side stream from another thread
        with run.bound(backup_id=backup_id, method=method):
            log.info("backup started")

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
                    metadata=result.manifest_metadata(),
                    row_counts=result.row_counts,
                    tool_versions={"backupd": __version__, **result.tool_versions},
                    host=socket.gethostname(),
                )
                repo.commit(manifest)
            except BaseException as exc:
                log.error("backup failed; removing its objects", objects=len(entries))
                _discard(ctx, backup_id)
                run.recorder.backup_failed(ctx.name, method)
                _record_run(ctx, RunRecord("failure", utcnow(), backup_id, run.describe(exc)))
                raise
            _record_run(ctx, RunRecord("success", utcnow(), backup_id))
            run.recorder.backup_succeeded(manifest)
            log.info("backup finished", raw=manifest.raw_size, stored=manifest.stored_size,
                     seconds=round(manifest.duration_seconds, 3))
            return manifest


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
