"""The daemon's own metrics, beside DESIGN.md's (same registry, same namespace)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from backupd.metrics import REGISTRY

SCHEDULER_EVENTS = Counter("backupd_scheduler_events", "Scheduler runs that failed, were missed or overlapped",
                           ["job_id", "event"], registry=REGISTRY)
JOB_LAST_RESULT = Gauge("backupd_job_last_result", "1 if the newest scheduled run succeeded, 0 if it failed",
                        ["job_id"], registry=REGISTRY)
JOB_CONSECUTIVE_FAILURES = Gauge("backupd_job_consecutive_failures",
                                 "Scheduled runs that failed in a row (0 after a success)", ["job_id"],
                                 registry=REGISTRY)
JOB_RUNNING = Gauge("backupd_job_running", "1 while the scheduled run is in progress", ["job_id"], registry=REGISTRY)
ARCHIVER_UP = Gauge("backupd_archiver_up", "1 while the log archiver runs, 0 while it waits to be restarted",
                    ["job", "archiver"], registry=REGISTRY)
ARCHIVER_RESTARTS = Counter("backupd_archiver_restarts", "Times a log archiver died and was restarted",
                            ["job", "archiver"], registry=REGISTRY)
DAEMON_START = Gauge("backupd_daemon_start_timestamp_seconds", "When the daemon started", registry=REGISTRY)
CONFIG_RELOADS = Counter("backupd_config_reloads", "SIGHUP reloads", ["result"], registry=REGISTRY)
BACKUP_SCHEDULE_PERIOD = Gauge("backupd_backup_schedule_period_seconds",
                               "Time between two scheduled backups of the job (alerts: backup older than allowed)",
                               ["job"], registry=REGISTRY)
