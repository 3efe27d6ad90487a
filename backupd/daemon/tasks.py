"""What the scheduler runs: backup (then prune), verification, integrity rotation, prune.

Every task takes a global slot (``daemon.max_parallel_jobs``), runs under a
cancel Event with its own timeout, as a ``JobRun`` (lock, log context, audit event,
metrics: ``backupd.jobrun``), and raises on failure so the scheduler's listener logs and counts it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
from typing import Callable, Iterator

import structlog

from backupd.backup import run_backup
from backupd.chain import FULL
from backupd.context import JobContext
from backupd.daemon import gaps as gap_watch
from backupd.daemon.metrics import JOB_RUNNING
from backupd.daemon.runs import Run, Runs, Slots
from backupd.daemon.state import ScheduleState
from backupd.errors import EXIT_VERIFY_BAD, Aborted, BackupdError, LockHeld, UntrustedObject
from backupd.jobrun import JobRun, MetricsRecorder
from backupd.settings import Settings
from backupd.timeutil import utcnow
from backupd.verify import record_metrics, run_verification, save_report, unusable_reports, untrusted_logs

log = structlog.get_logger(__name__)


#: How long a scheduled full waits for the job's lock when the job also takes diff or incr backups.
FULL_LOCK_WAIT = dt.timedelta(minutes=30)


class Skipped(Exception):
    """The run had nothing to do or was superseded (daemon stopping, lock held elsewhere)."""


class NotStarted(Skipped):
    """The run never got a slot before its timeout: a missed run (``backupd_backup_missed_runs_total``)."""


class Tasks:
    def __init__(self, settings: Callable[[], Settings], runs: Runs, slots: Slots, state: ScheduleState) -> None:
        self._settings = settings
        self.runs = runs
        self.slots = slots
        self.state = state
        self.recorder = MetricsRecorder()

    @contextlib.contextmanager
    def _task(self, kind: str, job: str, timeout: dt.timedelta | None,
              timeout_setting: str = "timeout") -> Iterator[tuple[JobContext, Run, JobRun]]:
        job_id = f"{kind}:{job}"
        settings = self._settings()
        if job not in settings.jobs:
            raise Skipped(f"{job_id}: job no longer configured")
        with self.runs.start(job_id, job, timeout.total_seconds() if timeout else None) as run:
            if not self.slots.acquire(run.cancel):
                if run.reason == "timeout":
                    raise NotStarted(f"{job_id}: not started: every slot of daemon.max_parallel_jobs was busy "
                                     "until the job's timeout")
                raise Skipped(f"{job_id}: not started ({run.reason})")
            ctx = JobContext(settings, job)
            job_run = JobRun(kind, job, trigger="schedule", ctx=ctx, recorder=self.recorder, abort=run,
                             timeout_setting=timeout_setting)
            JOB_RUNNING.labels(job, kind).set(1)
            try:
                with job_run.bound(task=kind):
                    yield ctx, run, job_run
            finally:
                JOB_RUNNING.labels(job, kind).set(0)
                self.slots.release()
                ctx.close()

    # -- backup --------------------------------------------------------------
    def backup(self, job: str, backup_type: str | None = None) -> None:
        """A scheduled backup: a full, or (``diff_schedule``, ``incr_schedule``) a diff or incr."""
        timeout = self._settings().jobs[job].timeout if job in self._settings().jobs else None
        with self._task(backup_task(backup_type or FULL), job, timeout) as (ctx, run, job_run):
            # A scheduled full waits for a diff or incr still running (they may fire at the same minute);
            # a diff or incr that finds the job running is skipped: the next one comes soon.
            typed = ctx.job.typed_schedules().keys() - {FULL}
            wait = FULL_LOCK_WAIT.total_seconds() if backup_type in (None, FULL) and typed else 0.0
            try:
                run_backup(ctx, backup_type=backup_type, wait=wait, cancel=run.cancel, run=job_run)
            except LockHeld as exc:
                log.warning("scheduled backup skipped", reason=str(exc))
                raise Skipped(str(exc)) from None
            except BaseException as exc:
                job_run.failed(exc)
                if isinstance(exc, Aborted):
                    raise Aborted(job_run.describe(exc)) from None
                raise
            job_run.succeeded()
            with contextlib.suppress(Exception):
                self.recorder.repository_backups(job, len(ctx.repository.backup_ids()))
            if not run.cancel.is_set():
                self._prune(ctx, after_backup=True)

    # -- retention -----------------------------------------------------------
    def prune(self, job: str) -> None:
        with self._task("prune", job, dt.timedelta(hours=1)) as (ctx, _run, _job_run):
            self._prune(ctx, after_backup=False)

    def _prune(self, ctx: JobContext, *, after_backup: bool) -> None:
        contexts = ctx.per_storage()
        if len(contexts) > 1:  # each repository by its own policy (retention_by_storage)
            errors: list[BaseException] = []
            for one in contexts:
                try:
                    with structlog.contextvars.bound_contextvars(storage=one.only_storage):
                        self._prune(one, after_backup=after_backup)
                except Skipped:
                    raise
                except BaseException as exc:  # one unreachable repository does not stop the others' pruning
                    errors.append(exc)
                finally:
                    one.close()
            if errors:
                raise errors[0]
            return
        if ctx.job.retention.is_empty():
            return
        try:
            from backupd.prune import PruneRefused, run_prune
        except ModuleNotFoundError as exc:
            if exc.name != "backupd.prune":
                raise
            log.warning("retention not applied: backupd.prune is not available in this build")
            return
        job_run = JobRun("prune", ctx.name, trigger="schedule", ctx=ctx, recorder=self.recorder)
        try:
            result = run_prune(ctx, run=job_run)
        except (LockHeld, PruneRefused) as exc:
            log.warning("prune skipped", reason=str(exc))
            if after_backup:
                return
            raise Skipped(str(exc)) from None
        except BaseException as exc:
            job_run.failed(exc)
            if after_backup:  # the backup itself succeeded; the failed prune is logged and retried next time
                log.error("prune after backup failed", error=str(exc))
                return
            raise
        job_run.succeeded(_summary(result))
        with contextlib.suppress(Exception):
            self.recorder.repository_backups(ctx.name, len(ctx.repository.backup_ids()))

    # -- verification --------------------------------------------------------
    def verify(self, job: str) -> None:
        settings = self._settings()
        timeout = settings.jobs[job].verify.timeout if job in settings.jobs else None
        with self._task("verify", job, timeout, "verify.timeout") as (ctx, run, job_run):
            if ctx.settings.encryption.identity_file is None:
                raise Skipped("full verification needs encryption.identity_file on this host")
            try:
                reports = run_verification(ctx, run=job_run)  # aborting the run kills its scratch servers and tools
            except BaseException as exc:
                job_run.failed(exc)
                if run.cancel.is_set():
                    raise Aborted(f"verification {job_run.describe(exc)}") from None
                raise
            report = reports[0]
            job_run.succeeded("; ".join(report.problems) or None, result="passed" if report.ok else "failed",
                              code=0 if report.ok else EXIT_VERIFY_BAD, backup_id=report.backup_id)
            if not report.ok:
                raise BackupdError(f"verification of {report.backup_id} failed: {'; '.join(report.problems)}")

    def integrity(self, job: str) -> None:
        """Read a share of the backups so each is read in full once per ``verify.full_read_interval``."""
        with self._task("integrity", job, None) as (ctx, run, job_run), ctx.one_listing():  # the log archive scanned once
            self.watch_gaps(ctx)
            interval = ctx.job.verify.full_read_interval
            ctx.repository.reverify_index()  # every manifest read once: a bad one fails the rotation
            manifests, unusable = ctx.repository.scan_manifests()
            ctx.log_reaches(manifests, record=True)  # from the rotation's one listing: what ``list`` extends
            if ctx.repository.trusted:  # what failed its signature check at this verification: manifests and logs
                bad_logs, _ = untrusted_logs(ctx)
                for line in bad_logs:
                    log.warning("archived log not trusted", problem=line)
                self.recorder.untrusted_objects(job, len(bad_logs) + sum(isinstance(exc, UntrustedObject)
                                                                         for _, exc in unusable))
            reads = self.state.integrity_reads(job)
            present = {m.backup_id for m in manifests}
            reads = {k: v for k, v in reads.items() if k in present}
            epoch = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
            manifests.sort(key=lambda m: reads.get(m.backup_id, epoch))
            now = utcnow()
            period = integrity_period(interval)
            share = math.ceil(len(manifests) * period / interval) if manifests else 0
            due = [m for m in manifests if now - reads.get(m.backup_id, epoch) >= interval - period]
            chosen = manifests[:max(share, len(due))] if due or share else []
            bad = unusable_reports(ctx, unusable)  # checked every rotation until it is fixed or pruned
            for report in bad:
                save_report(ctx, report)
                record_metrics(report, self.recorder)
            for manifest in chosen:
                run.check()
                report = run_verification(ctx, manifest.backup_id, integrity_only=True, run=job_run)[0]
                reads[manifest.backup_id] = utcnow()
                if not report.ok:
                    bad.append(report)
                    save_report(ctx, report)
                    record_metrics(report, self.recorder)
            self.state.set_integrity_reads(job, reads)
            log.info("integrity rotation done", checked=len(chosen), bad=len(bad), backups=len(manifests))
            if bad:
                raise BackupdError("integrity check failed: " + "; ".join(p for r in bad for p in r.problems))

    def watch_gaps(self, ctx: JobContext) -> None:
        """Count gaps in the job's archived logs the daemon has not seen yet (never fatal: storage may be down)."""
        try:
            gap_watch.watch(ctx)
        except Exception as exc:
            log.warning("could not check the log archive for gaps", job=ctx.name, error=str(exc))


def backup_task(backup_type: str) -> str:
    """The scheduler's task of a backup type: ``backup`` for fulls, ``backup-diff``, ``backup-incr``."""
    return "backup" if backup_type == FULL else f"backup-{backup_type}"


def integrity_period(interval: dt.timedelta) -> dt.timedelta:
    """How often the integrity rotation runs: a quarter of the interval, at most daily, at least hourly."""
    return max(dt.timedelta(hours=1), min(dt.timedelta(days=1), interval / 4))


def _summary(result: object) -> str | None:
    backups = getattr(result, "deleted_backups", None)
    objects = getattr(result, "deleted_objects", None)
    if backups is None and objects is None:
        return None
    return f"deleted {len(backups or [])} backup(s), {objects or 0} object(s)"
