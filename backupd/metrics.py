"""Every metric DESIGN.md names, in one registry (namespace ``backupd_``).

Modules record into these objects directly; the daemon serves the registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

from backupd import __version__

disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)

BACKUP_LAST_SUCCESS = Gauge("backupd_backup_last_success_timestamp_seconds",
                            "End of the newest successful backup", ["job", "method"], registry=REGISTRY)
BACKUP_LAST_DURATION = Gauge("backupd_backup_last_duration_seconds",
                             "Wall time of the newest successful backup", ["job", "method"], registry=REGISTRY)
BACKUP_LAST_SIZE = Gauge("backupd_backup_last_size_bytes",
                         "Size of the newest successful backup before (raw) and after (stored) compression",
                         ["job", "method", "kind"], registry=REGISTRY)
BACKUP_RUNS = Counter("backupd_backup_runs", "Backup attempts", ["job", "method", "result"], registry=REGISTRY)

ARCHIVE_LAST_SUCCESS = Gauge("backupd_archive_last_success_timestamp_seconds",
                             "Time the newest log file became durable in storage", ["job"], registry=REGISTRY)
ARCHIVE_FAILURES = Counter("backupd_archive_failures", "Failed log pushes", ["job"], registry=REGISTRY)
ARCHIVE_LAG = Gauge("backupd_archive_lag_seconds",
                    "Age of the oldest log not yet in storage (the live RPO)", ["job"], registry=REGISTRY)
ARCHIVE_GAPS = Counter("backupd_archive_gaps", "Gaps found in the archived log sequence", ["job"], registry=REGISTRY)
PITR_WINDOW_START = Gauge("backupd_pitr_window_start_timestamp_seconds",
                          "Earliest time the repository can restore to", ["job"], registry=REGISTRY)

VERIFICATION_LAST_SUCCESS = Gauge("backupd_verification_last_success_timestamp_seconds",
                                  "Newest verification that passed", ["job"], registry=REGISTRY)
VERIFICATION_LAST_RESULT = Gauge("backupd_verification_last_result",
                                 "1 if the newest verification passed, 0 if it failed", ["job"], registry=REGISTRY)
VERIFICATION_LAST_RESTORE = Gauge("backupd_verification_last_restore_seconds",
                                  "Measured restore time of the newest verification (the RTO)", ["job"],
                                  registry=REGISTRY)

RETENTION_DELETED = Counter("backupd_retention_deleted_objects", "Objects pruned", ["job"], registry=REGISTRY)
REPOSITORY_BACKUPS = Gauge("backupd_repository_backups", "Backups the repository holds", ["job"], registry=REGISTRY)
BUILD_INFO = Gauge("backupd_build_info", "Always 1; the version label tells which", ["version"], registry=REGISTRY)
BUILD_INFO.labels(__version__).set(1)
