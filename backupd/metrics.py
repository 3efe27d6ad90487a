"""Every metric DESIGN.md names, in one registry (namespace ``backupd_``).

Modules record into these objects directly; the daemon serves the registry.
Every counter is declared at 0 for each configured job and each label value it
can take (``declare_job``), so the first failure is already an increase an
alert can see; ``forget_job`` drops the series of a job a reload removed.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

from backupd import __version__

disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)

BACKUP_LABELS = ["job", "method", "type"]
RESULTS = ("success", "failure")

BACKUP_LAST_SUCCESS = Gauge("backupd_backup_last_success_timestamp_seconds",
                            "End of the newest successful backup", BACKUP_LABELS, registry=REGISTRY)
BACKUP_LAST_DURATION = Gauge("backupd_backup_last_duration_seconds",
                             "Wall time of the newest successful backup", BACKUP_LABELS, registry=REGISTRY)
BACKUP_LAST_SIZE = Gauge("backupd_backup_last_size_bytes",
                         "Size of the newest successful backup before (raw) and after (stored) compression",
                         [*BACKUP_LABELS, "kind"], registry=REGISTRY)
BACKUP_RUNS = Counter("backupd_backup_runs", "Backup attempts", [*BACKUP_LABELS, "result"], registry=REGISTRY)
BACKUP_MISSED_RUNS = Counter("backupd_backup_missed_runs",
                             "Scheduled backups that did not start on time (missed past their grace, or "
                             "skipped because the previous run was still going)", ["job"], registry=REGISTRY)

ARCHIVE_LAST_SUCCESS = Gauge("backupd_archive_last_success_timestamp_seconds",
                             "Time the newest log file became durable in storage", ["job"], registry=REGISTRY)
ARCHIVE_FAILURES = Counter("backupd_archive_failures", "Failed log pushes", ["job"], registry=REGISTRY)
ARCHIVE_LAG = Gauge("backupd_archive_lag_seconds",
                    "Age of the oldest log not yet in storage (the live RPO)", ["job"], registry=REGISTRY)
ARCHIVE_GAPS = Counter("backupd_archive_gaps", "Gaps found in the archived log sequence", ["job"], registry=REGISTRY)
PITR_WINDOW_START = Gauge("backupd_pitr_window_start_timestamp_seconds",
                          "Earliest time the repository can restore to", ["job"], registry=REGISTRY)

VERIFICATION_LAST_SUCCESS = Gauge("backupd_verification_last_success_timestamp_seconds",
                                  "Newest verification that passed (0: none ever passed)", ["job"], registry=REGISTRY)
VERIFICATION_LAST_RESULT = Gauge("backupd_verification_last_result",
                                 "1 if the newest verification passed, 0 if it failed", ["job"], registry=REGISTRY)
VERIFICATION_LAST_RESTORE = Gauge("backupd_verification_last_restore_seconds",
                                  "Measured restore time of the newest verification (the RTO)", ["job"],
                                  registry=REGISTRY)

RETENTION_DELETED = Counter("backupd_retention_deleted_objects", "Objects pruned", ["job"], registry=REGISTRY)
REPOSITORY_BACKUPS = Gauge("backupd_repository_backups", "Backups the repository holds", ["job"], registry=REGISTRY)
REPOSITORY_UNTRUSTED = Gauge("backupd_repository_untrusted_objects",
                             "Objects whose signature failed or was missing at the last listing or verification",
                             ["job"], registry=REGISTRY)
STORAGE_UP = Gauge("backupd_storage_up", "1 when the last operation on the storage succeeded", ["storage"],
                   registry=REGISTRY)
COPY_BEHIND_OBJECTS = Gauge("backupd_copy_behind_objects", "Objects a repository of the job still lacks",
                            ["job", "storage"], registry=REGISTRY)
COPY_BEHIND_SECONDS = Gauge("backupd_copy_behind_seconds", "Age of the oldest object a repository of the job lacks",
                            ["job", "storage"], registry=REGISTRY)
BUILD_INFO = Gauge("backupd_build_info", "Always 1; the version label tells which", ["version"], registry=REGISTRY)
BUILD_INFO.labels(__version__).set(1)

#: Counters and gauges labelled by job (first label), for declare_job / forget_job.
_JOB_METRICS = (BACKUP_LAST_SUCCESS, BACKUP_LAST_DURATION, BACKUP_LAST_SIZE, BACKUP_RUNS, BACKUP_MISSED_RUNS,
                ARCHIVE_LAST_SUCCESS, ARCHIVE_FAILURES, ARCHIVE_LAG, ARCHIVE_GAPS, PITR_WINDOW_START,
                VERIFICATION_LAST_SUCCESS, VERIFICATION_LAST_RESULT, VERIFICATION_LAST_RESTORE,
                RETENTION_DELETED, REPOSITORY_BACKUPS, REPOSITORY_UNTRUSTED, COPY_BEHIND_OBJECTS, COPY_BEHIND_SECONDS)


def backup_types(method: str) -> tuple[str, ...]:
    """The ``type`` label values a backup of this method takes (``full`` for logical backups)."""
    return ("full",)  # diff and incr come with physical backup types (DESIGN.md "Backup types")


def declare_job(job: str, methods: Iterable[str], *, archives_logs: bool) -> None:
    """Every counter of ``job`` at 0 (an existing series keeps its value), and the never-verified 0."""
    for method in methods:
        for kind in backup_types(method):
            for result in RESULTS:
                BACKUP_RUNS.labels(job, method, kind, result)
    BACKUP_MISSED_RUNS.labels(job)
    RETENTION_DELETED.labels(job)
    if archives_logs:
        ARCHIVE_FAILURES.labels(job)
        ARCHIVE_GAPS.labels(job)
        ARCHIVE_LAG.labels(job)
    VERIFICATION_LAST_SUCCESS.labels(job)  # 0 until a verification passes: "never verified" can alert


def declare_storages(job: str, storages: Iterable[str]) -> None:
    """The job's repositories at 0 behind, and each storage's up gauge (0 until an operation on it succeeds)."""
    for storage in storages:
        STORAGE_UP.labels(storage)
        COPY_BEHIND_OBJECTS.labels(job, storage)
        COPY_BEHIND_SECONDS.labels(job, storage)


def forget_job(job: str) -> None:
    """Drop every series of a job that is no longer configured."""
    for metric in _JOB_METRICS:
        for labels in [key for key in list(metric._metrics) if key and key[0] == job]:  # noqa: SLF001
            with contextlib.suppress(KeyError):
                metric.remove(*labels)
