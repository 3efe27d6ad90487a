"""One run of a job, whoever started it: the CLI, the daemon's scheduler or its control socket.

A ``JobRun`` holds the bookkeeping every run shares, written once here:

- the job's lock (``lock()``, the flock a scheduled run and a manual one share),
- the log context (``bound()``: ``job`` and the task on every log line of the run),
- the audit record (``succeeded()``/``failed()``/``record()``, trigger ``cli``,
  ``schedule`` or ``control``),
- the metrics, through an injected ``Recorder`` (``MetricsRecorder`` in a process
  that serves /metrics, ``NO_RECORDER`` in a one-shot command, where they would be
  lost at exit),
- the error's description and its exit status (``describe()``, ``exit_status()``:
  ``main()`` and the audit trail read them from here).

Only ``backupd.errors`` is imported at module level: ``main()`` reads exit statuses
from here on the path PostgreSQL starts once per WAL file.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Protocol

from backupd.errors import EXIT_FAILURE, EXIT_INTERRUPTED, Aborted, BackupdError, from_os_error

if TYPE_CHECKING:
    import threading
    from pathlib import Path

    from backupd.context import JobContext
    from backupd.manifest import Manifest
    from backupd.settings import Settings


# -- errors ------------------------------------------------------------------------
def as_error(exc: BaseException) -> BackupdError | None:
    """``exc`` as backupd's own error (an OS error on backupd's own files included); None for a bug or SIGINT."""
    if isinstance(exc, BackupdError):
        return exc
    if isinstance(exc, OSError):
        return from_os_error(exc)
    return None


def exit_status(exc: BaseException) -> int:
    """The exit status a command that raised ``exc`` ends with."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    error = as_error(exc)
    return error.exit_code if error is not None else EXIT_FAILURE


def describe(exc: BaseException) -> str:
    """One line for the audit trail and a control reply: backupd's errors say what is wrong; others name their type."""
    if isinstance(exc, BackupdError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted by SIGINT"
    return f"{type(exc).__name__}: {exc}"


class Abortable(Protocol):
    """What the daemon knows of a run it can abort (``backupd.daemon.runs.Run``)."""

    job: str
    timeout: float | None
    reason: str | None

    @property
    def cancel(self) -> threading.Event: ...


# -- metrics -----------------------------------------------------------------------
class Recorder:
    """Where a run's metrics go. This base records nothing: one-shot commands serve no registry."""

    def backup_succeeded(self, manifest: Manifest) -> None:
        """A backup attempt that committed its manifest: the runs counter and the newest-backup gauges."""

    def backup_failed(self, job: str, method: str, backup_type: str) -> None:
        """A backup attempt that committed nothing (``backup_type``: the type asked for)."""

    def newest_backup(self, manifest: Manifest) -> None:
        """The gauges of the newest backup of its method and type (read from the repository)."""

    def repository_backups(self, job: str, count: int) -> None:
        """How many backups the job's repository holds."""

    def untrusted_objects(self, job: str, count: int) -> None:
        """How many of the job's backups no trusted key signed (with ``trusted_keys`` set)."""

    def pruned(self, job: str, deleted_objects: int, kept: int, restorable_from: float | None) -> None:
        """A prune applied: objects it deleted, backups kept, where the PITR window starts now (epoch seconds)."""

    def verified(self, job: str, passed: bool, restore_seconds: float | None) -> None:
        """The newest verification's result (and how long its restore took, for a full one)."""

    def verification_passed(self, job: str, at: float) -> None:
        """A verification passed at ``at`` (epoch seconds); the gauge never moves backwards."""

    def storage_state(self, storage: str, up: bool) -> None:
        """Whether the last operation on a storage of a copies set succeeded."""


NO_RECORDER = Recorder()


class MetricsRecorder(Recorder):
    """Records into ``backupd.metrics``, the registry the daemon serves on /metrics."""

    def __init__(self) -> None:
        from backupd import metrics

        self.metrics = metrics

    def backup_succeeded(self, manifest: Manifest) -> None:
        self.metrics.BACKUP_RUNS.labels(manifest.job, manifest.method, manifest.backup_type, "success").inc()
        self.newest_backup(manifest)

    def backup_failed(self, job: str, method: str, backup_type: str) -> None:
        self.metrics.BACKUP_RUNS.labels(job, method, backup_type, "failure").inc()

    def newest_backup(self, manifest: Manifest) -> None:
        labels = (manifest.job, manifest.method, manifest.backup_type)
        self.metrics.BACKUP_LAST_SUCCESS.labels(*labels).set(manifest.finished_at.timestamp())
        self.metrics.BACKUP_LAST_DURATION.labels(*labels).set(manifest.duration_seconds)
        self.metrics.BACKUP_LAST_SIZE.labels(*labels, "raw").set(manifest.raw_size)
        self.metrics.BACKUP_LAST_SIZE.labels(*labels, "stored").set(manifest.stored_size)

    def repository_backups(self, job: str, count: int) -> None:
        self.metrics.REPOSITORY_BACKUPS.labels(job).set(count)

    def untrusted_objects(self, job: str, count: int) -> None:
        self.metrics.REPOSITORY_UNTRUSTED.labels(job).set(count)

    def pruned(self, job: str, deleted_objects: int, kept: int, restorable_from: float | None) -> None:
        self.metrics.RETENTION_DELETED.labels(job).inc(deleted_objects)
        self.repository_backups(job, kept)
        if restorable_from is not None:
            self.metrics.PITR_WINDOW_START.labels(job).set(restorable_from)

    def verified(self, job: str, passed: bool, restore_seconds: float | None) -> None:
        self.metrics.VERIFICATION_LAST_RESULT.labels(job).set(1 if passed else 0)
        if restore_seconds is not None:
            self.metrics.VERIFICATION_LAST_RESTORE.labels(job).set(restore_seconds)

    def verification_passed(self, job: str, at: float) -> None:
        gauge = self.metrics.VERIFICATION_LAST_SUCCESS.labels(job)
        gauge.set(max(at, gauge._value.get()))  # noqa: SLF001

    def storage_state(self, storage: str, up: bool) -> None:
        self.metrics.STORAGE_UP.labels(storage).set(1 if up else 0)


def process_recorder() -> Recorder:
    """The recorder of this process: the metrics registry once something serves it, else none.

    Whether a command records never depends on which module loaded first: only the
    daemon (and a test standing in for it) imports ``backupd.metrics``."""
    from backupd.served_metrics import served

    return MetricsRecorder() if served() is not None else NO_RECORDER


# -- the run -----------------------------------------------------------------------
class JobRun:
    """One run of ``command`` on ``job``: its lock, log context, audit record, metrics and exit status.

    ``ctx`` is the job's context when the run has one; a CLI command that failed before
    its configuration loaded has none, and ``settings`` (known once loaded) tells where
    its audit record goes. ``backup_id`` names the backup the run made or read, as soon
    as it is known. ``abort`` is the daemon's handle on the run, which says why a
    cancelled run stopped (its tools were killed, so their errors say little).
    """

    def __init__(self, command: str, job: str | None, *, trigger: str = "cli", ctx: JobContext | None = None,
                 settings: Settings | None = None, recorder: Recorder | None = None,
                 abort: Abortable | None = None, timeout_setting: str = "timeout") -> None:
        self.command = command
        self.job = job
        self.trigger = trigger
        self.ctx = ctx
        self.settings = settings if settings is not None or ctx is None else ctx.settings
        self.recorder = recorder if recorder is not None else process_recorder()
        self.abort = abort
        self.timeout_setting = timeout_setting
        self.backup_id: str | None = None

    @classmethod
    def of(cls, ctx: JobContext, command: str, run: JobRun | None = None) -> JobRun:
        """``run`` when a caller started one, else a run of ``command`` on ``ctx``'s job."""
        return run if run is not None else cls(command, ctx.name, ctx=ctx)

    # -- lock and log context ---------------------------------------------------------
    def lock(self, state_dir: Path | None = None, *, wait: float = 0.0,
             cancel: threading.Event | None = None) -> contextlib.AbstractContextManager[None]:
        from backupd.locks import job_lock

        if self.job is None:
            raise ValueError(f"{self.command}: a run without a job has no lock")
        if state_dir is None:
            if self.ctx is None:
                raise ValueError(f"{self.command}: the lock needs the job's state directory")
            state_dir = self.ctx.state_dir
        return job_lock(state_dir, self.job, wait=wait, cancel=cancel)

    @contextlib.contextmanager
    def bound(self, **context: Any) -> Iterator[JobRun]:
        """Every log line inside names the job (and whatever else is given: ``task``, ``op``, ``stage``)."""
        import structlog

        with structlog.contextvars.bound_contextvars(job=self.job, **context):
            yield self

    # -- outcome --------------------------------------------------------------------
    def describe(self, exc: BaseException) -> str:
        """The run's failure; once the daemon cancelled it, why."""
        abort = self.abort
        if abort is not None:
            cancelled = isinstance(exc, Aborted) or abort.cancel.is_set()
            if cancelled and abort.reason == "timeout":
                return f"timed out after {abort.timeout or 0:.0f} s and was aborted (jobs.{abort.job}.{self.timeout_setting})"
            if cancelled and abort.reason:
                return f"aborted ({abort.reason})"
        return describe(exc)

    def succeeded(self, detail: str | None = None, *, result: str = "success", code: int = 0,
                  backup_id: str | None = None) -> None:
        self.record(result, detail, code, backup_id=backup_id)

    def failed(self, exc: BaseException, detail: str | None = None) -> int:
        """Record the failure (``interrupted`` for SIGINT); returns the exit status it stands for."""
        code = exit_status(exc)
        result = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failure"
        self.record(result, detail if detail is not None else self.describe(exc), code)
        return code

    def record(self, result: str, detail: str | None, code: int, *, backup_id: str | None = None) -> None:
        """The audit event, in the state directory's ``audit.log`` and the job's repository; never raises."""
        from backupd import audit

        if self.ctx is None and self.settings is None:
            return  # no state_dir known: nothing ran against a repository either
        event = audit.make_event(self.command, job=self.job, backup_id=backup_id or self.backup_id, result=result,
                                 detail=detail, trigger=self.trigger, exit_code=code)
        if self.ctx is not None:
            audit.record_for_job(self.ctx, event)
            return
        assert self.settings is not None
        if self.job is None or self.job not in self.settings.jobs:
            audit.record(self.settings.daemon.state_dir, event)
            return
        from backupd.context import JobContext

        ctx = JobContext(self.settings, self.job)
        try:
            audit.record_for_job(ctx, event)
        finally:
            ctx.close()
