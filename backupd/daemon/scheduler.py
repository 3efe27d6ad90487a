"""APScheduler 3.x, configured so that runs are never silently dropped.

Jobs are rebuilt from the configuration under stable ids (``backup:orders``, and
``backup-diff:orders``, ``backup-incr:orders`` for ``diff_schedule``, ``incr_schedule``;
``verify:orders``, ``integrity:orders``, ``prune:orders``). Defaults: explicit
time zone, ``coalesce`` (a backlog runs once), ``max_instances=1``, and a
misfire grace of one schedule period unless ``daemon.misfire_grace_time`` says
otherwise (APScheduler's own default is one second). A listener logs and counts
errors, misses and overlaps. Last run times are persisted, so a run missed
while the daemon was down runs once at start when it is still within its grace.
A backup that did not start on time (missed past its grace, at start or while
running, or skipped because the previous run still ran) counts in
``backupd_backup_missed_runs_total``.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import zoneinfo
from dataclasses import dataclass
from typing import Callable

import structlog
from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
    JobExecutionEvent,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger

from backupd import metrics
from backupd.chain import BACKUP_TYPES, DIFF, INCR
from backupd.daemon.metrics import (
    BACKUP_SCHEDULE_PERIOD,
    JOB_CONSECUTIVE_FAILURES,
    JOB_LAST_RESULT,
    SCHEDULER_EVENTS,
    declare_task,
    forget_task,
)
from backupd.daemon.state import ScheduleState
from backupd.daemon.tasks import NotStarted, Skipped, Tasks, backup_task, integrity_period
from backupd.jobrun import describe
from backupd.daemon.triggers import build_trigger, latest_missed, period
from backupd.errors import BackupdError
from backupd.settings import Settings

log = structlog.get_logger(__name__)

DEFAULT_VERIFY_SCHEDULE = "0 6 * * *"
PRUNE_EVERY = dt.timedelta(days=1)
EXECUTOR_THREADS = 64  # threads are cheap and idle; daemon.max_parallel_jobs bounds the work


BACKUP_TASKS = frozenset(backup_task(kind) for kind in BACKUP_TYPES)


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    job: str
    kind: str  # backup | backup-diff | backup-incr | verify | integrity | prune
    schedule: str  # what the trigger was built from; a change rebuilds the job
    grace: dt.timedelta | None
    jitter: dt.timedelta | None
    timezone: str


def desired_jobs(settings: Settings) -> list[JobSpec]:
    d = settings.daemon
    specs = []
    for name, job in sorted(settings.jobs.items()):
        def spec(kind: str, schedule: str) -> JobSpec:
            return JobSpec(f"{kind}:{name}", name, kind, schedule, d.misfire_grace_time, d.jitter, d.timezone)

        if job.schedule:
            specs.append(spec("backup", job.schedule))
        for kind in (DIFF, INCR):  # diff_schedule, incr_schedule (DESIGN.md "Backup types")
            if schedule := job.typed_schedules().get(kind):
                specs.append(spec(backup_task(kind), schedule))
        if job.typed_schedules() and not all(job.retention_for(storage).is_empty() for storage in job.storages):
            specs.append(spec("prune", f"@every {int(PRUNE_EVERY.total_seconds())}s"))
        if job.verify.schedule or (job.schedule and settings.encryption.identity_file is not None):
            specs.append(spec("verify", job.verify.schedule or DEFAULT_VERIFY_SCHEDULE))
        if job.schedule or job.verify.schedule:
            every = integrity_period(job.verify.full_read_interval)
            specs.append(spec("integrity", f"@every {int(every.total_seconds())}s"))
    return specs


class Scheduler:
    def __init__(self, tasks: Tasks, state: ScheduleState, timezone: str) -> None:
        self.tasks = tasks
        self.state = state
        self.specs: dict[str, JobSpec] = {}
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)  # misses, overlaps: the listener
        # The listener logs every failed run (with the traceback of internal errors only).
        logging.getLogger("apscheduler.executors").setLevel(logging.CRITICAL)
        self.aps = BackgroundScheduler(
            timezone=zoneinfo.ZoneInfo(timezone),
            executors={"default": ThreadPoolExecutor(EXECUTOR_THREADS)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
        )
        self.aps.add_listener(self._on_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES
                              | EVENT_JOB_EXECUTED)

    def _function(self, kind: str) -> Callable[[str], None]:
        functions: dict[str, Callable[[str], None]] = {
            "backup": self.tasks.backup, "verify": self.tasks.verify, "integrity": self.tasks.integrity,
            "prune": self.tasks.prune}
        for backup_type in (DIFF, INCR):
            functions[backup_task(backup_type)] = functools.partial(self.tasks.backup, backup_type=backup_type)
        return functions[kind]

    def apply(self, settings: Settings) -> None:
        """Make the scheduled jobs match ``settings``: unchanged jobs keep their next run time."""
        wanted = {spec.job_id: spec for spec in desired_jobs(settings)}
        for job_id in list(self.specs):
            if job_id not in wanted:
                self.aps.remove_job(job_id)
                spec = self.specs.pop(job_id)
                forget_task(spec.job, spec.kind)
                log.info("job unscheduled", job_id=job_id)
        now = dt.datetime.now(dt.timezone.utc)
        for job_id, spec in wanted.items():
            if self.specs.get(job_id) == spec:
                continue
            tz = zoneinfo.ZoneInfo(spec.timezone)
            trigger = build_trigger(spec.schedule, tz, spec.jitter)
            every = period(trigger, now)
            grace = spec.grace or max(every, dt.timedelta(seconds=1))
            if spec.kind == "backup":
                BACKUP_SCHEDULE_PERIOD.labels(spec.job).set(every.total_seconds())
            declare_task(spec.job, spec.kind)
            kwargs = {}
            missed = self._missed(spec, trigger, grace, now)
            if missed is not None:
                kwargs["next_run_time"] = now.astimezone(tz)
                log.warning("running a missed run now", job_id=job_id, missed=missed.isoformat(),
                            grace_seconds=grace.total_seconds())
            self.state.set_last_run(job_id, now, only_if_missing=True)
            self.aps.add_job(self._function(spec.kind), trigger, args=[spec.job], id=job_id, name=job_id,
                             replace_existing=True, misfire_grace_time=max(1, int(grace.total_seconds())),
                             coalesce=True, max_instances=1, **kwargs)
            self.specs[job_id] = spec
            job = self.aps.get_job(job_id)
            when = getattr(job, "next_run_time", None)
            log.info("job scheduled", job_id=job_id, schedule=spec.schedule,
                     next_run=when.isoformat() if when else "after start")

    def _missed(self, spec: JobSpec, trigger: BaseTrigger, grace: dt.timedelta, now: dt.datetime
                ) -> dt.datetime | None:
        job_id = spec.job_id
        last = self.state.last_run(job_id)
        if last is None:
            return None
        missed = latest_missed(trigger, last, now)
        if missed is None:
            return None
        if now - missed > grace:
            log.warning("missed run is past its grace time; waiting for the next one", job_id=job_id,
                        missed=missed.isoformat(), grace_seconds=grace.total_seconds())
            self._count(spec.job, spec.kind, "missed")
            return None
        return missed

    @staticmethod
    def _count(job: str, task: str, event: str) -> None:
        SCHEDULER_EVENTS.labels(job, task, event).inc()
        if task in BACKUP_TASKS and event in ("missed", "max_instances"):
            metrics.BACKUP_MISSED_RUNS.labels(job).inc()

    def _on_event(self, event: JobEvent) -> None:
        job_id = event.job_id
        task, _, job = job_id.partition(":")
        if event.code == EVENT_JOB_MISSED:
            self._count(job, task, "missed")
            log.warning("scheduled run missed (past its grace time)", job_id=job_id,
                        scheduled=str(event.scheduled_run_time))
            return
        if event.code == EVENT_JOB_MAX_INSTANCES:
            self._count(job, task, "max_instances")
            log.warning("scheduled run skipped: the previous one is still running", job_id=job_id)
            return
        assert isinstance(event, JobExecutionEvent)
        if event.code == EVENT_JOB_ERROR and isinstance(event.exception, NotStarted):
            self._count(job, task, "missed")
            log.warning("scheduled run could not start", job_id=job_id, reason=str(event.exception))
            return
        if event.code == EVENT_JOB_ERROR and isinstance(event.exception, Skipped):
            log.info("scheduled run skipped", job_id=job_id, reason=str(event.exception))
            return
        self.state.set_last_run(job_id, event.scheduled_run_time)
        if event.code == EVENT_JOB_EXECUTED:
            JOB_LAST_RESULT.labels(job, task).set(1)
            JOB_CONSECUTIVE_FAILURES.labels(job, task).set(0)
            return
        self._count(job, task, "error")
        JOB_LAST_RESULT.labels(job, task).set(0)
        JOB_CONSECUTIVE_FAILURES.labels(job, task).inc()
        if isinstance(event.exception, BackupdError):
            log.error("scheduled run failed", job_id=job_id, error=describe(event.exception))
        else:
            log.error("scheduled run failed with an internal error", job_id=job_id,
                      error=describe(event.exception), traceback=event.traceback)

    @property
    def alive(self) -> bool:
        thread = getattr(self.aps, "_thread", None)
        return bool(self.aps.running and thread is not None and thread.is_alive())

    def start(self) -> None:
        self.aps.start()

    def stop_scheduling(self) -> None:
        """No new runs; running ones continue (the daemon drains them)."""
        if self.aps.running:
            self.aps.shutdown(wait=False)
