"""The daemon's own metrics, beside DESIGN.md's (same registry, same namespace).

Per scheduled job they carry ``job`` (the backupd job, as DESIGN.md's metrics do) and
``task`` (backup, verify, integrity, prune): the scheduler's id ``backup:orders`` is
``{job="orders", task="backup"}``.
"""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge

from backupd.metrics import REGISTRY

EVENTS = ("error", "missed", "max_instances")

SCHEDULER_EVENTS = Counter("backupd_scheduler_events", "Scheduler runs that failed, were missed or overlapped",
                           ["job", "task", "event"], registry=REGISTRY)
JOB_LAST_RESULT = Gauge("backupd_job_last_result", "1 if the newest scheduled run succeeded, 0 if it failed",
                        ["job", "task"], registry=REGISTRY)
JOB_CONSECUTIVE_FAILURES = Gauge("backupd_job_consecutive_failures",
                                 "Scheduled runs that failed in a row (0 after a success)", ["job", "task"],
                                 registry=REGISTRY)
JOB_RUNNING = Gauge("backupd_job_running", "1 while the scheduled run is in progress", ["job", "task"],
                    registry=REGISTRY)
ARCHIVER_UP = Gauge("backupd_archiver_up",
                    "1 while the log archiver runs and reaches its source; 0 while it fails and is retried",
                    ["job", "archiver"], registry=REGISTRY)
ARCHIVER_RESTARTS = Counter("backupd_archiver_restarts", "Times a log archiver died and was restarted",
                            ["job", "archiver"], registry=REGISTRY)
DAEMON_START = Gauge("backupd_daemon_start_timestamp_seconds", "When the daemon started", registry=REGISTRY)
CONFIG_RELOADS = Counter("backupd_config_reloads", "SIGHUP reloads", ["result"], registry=REGISTRY)
CONFIG_RELOADS.labels("success")
CONFIG_RELOADS.labels("failure")
BACKUP_SCHEDULE_PERIOD = Gauge("backupd_backup_schedule_period_seconds",
                               "Time between two scheduled backups of the job (alerts: backup older than allowed)",
                               ["job"], registry=REGISTRY)


def declare_task(job: str, task: str) -> None:
    """A newly scheduled job's series at 0: counters, failures in a row, running."""
    for event in EVENTS:
        SCHEDULER_EVENTS.labels(job, task, event)
    JOB_CONSECUTIVE_FAILURES.labels(job, task)
    JOB_RUNNING.labels(job, task)


def forget_task(job: str, task: str) -> None:
    for metric, labels in [*((SCHEDULER_EVENTS, (job, task, event)) for event in EVENTS),
                           (JOB_LAST_RESULT, (job, task)), (JOB_CONSECUTIVE_FAILURES, (job, task)),
                           (JOB_RUNNING, (job, task))]:
        with contextlib.suppress(KeyError):
            metric.remove(*labels)
    if task == "backup":
        with contextlib.suppress(KeyError):
            BACKUP_SCHEDULE_PERIOD.remove(job)


def forget_archiver(job: str, archiver: str) -> None:
    for metric in (ARCHIVER_UP, ARCHIVER_RESTARTS):
        with contextlib.suppress(KeyError):
            metric.remove(job, archiver)
