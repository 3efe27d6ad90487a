"""Metrics filled from the repository, so a restarted daemon reports the truth at once.

``backupd_backup_last_success_timestamp_seconds`` and its siblings come from the
newest committed manifest of each job; verification gauges from the newest
reports under ``<job>/verify/``. Storage is the truth; nothing is cached here.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import structlog

from backupd import metrics
from backupd.catalog import Catalog
from backupd.context import JobContext
from backupd.manifest import Manifest
from backupd.timeutil import parse_timestamp

log = structlog.get_logger(__name__)

REPORTS_SCANNED = 50  # how far back to look for the newest passed verification


def set_backup_gauges(manifest: Manifest) -> None:
    labels = (manifest.job, manifest.method)
    metrics.BACKUP_LAST_SUCCESS.labels(*labels).set(manifest.finished_at.timestamp())
    metrics.BACKUP_LAST_DURATION.labels(*labels).set(manifest.duration_seconds)
    metrics.BACKUP_LAST_SIZE.labels(*labels, "raw").set(manifest.raw_size)
    metrics.BACKUP_LAST_SIZE.labels(*labels, "stored").set(manifest.stored_size)


def refresh_backups(ctx: JobContext) -> int:
    """Backup gauges from the newest manifest per method; returns the number of backups."""
    catalog = Catalog(ctx.state_dir)
    try:
        manifests = catalog.manifests(ctx.repository)  # newest first
    finally:
        catalog.close()
    newest: dict[str, Manifest] = {}
    for manifest in manifests:
        newest.setdefault(manifest.method, manifest)
    for manifest in newest.values():
        set_backup_gauges(manifest)
    metrics.REPOSITORY_BACKUPS.labels(ctx.name).set(len(manifests))
    return len(manifests)


def refresh_verification(ctx: JobContext) -> dict[str, Any] | None:
    """Verification gauges from the newest report (and the newest passed one)."""
    keys = sorted(ctx.repository.iter_reports(), reverse=True)[:REPORTS_SCANNED]
    newest: dict[str, Any] | None = None
    for key in keys:
        report = _read_report(ctx, key)
        if report is None:
            continue
        if newest is None:
            newest = report
            metrics.VERIFICATION_LAST_RESULT.labels(ctx.name).set(1 if report.get("result") == "passed" else 0)
            if isinstance(report.get("restore_seconds"), (int, float)):
                metrics.VERIFICATION_LAST_RESTORE.labels(ctx.name).set(report["restore_seconds"])
        if report.get("result") == "passed":
            with contextlib.suppress(KeyError, TypeError, ValueError):
                when = parse_timestamp(report.get("finished_at") or report["started_at"])
                metrics.VERIFICATION_LAST_SUCCESS.labels(ctx.name).set(when.timestamp())
            break
    return newest


def _read_report(ctx: JobContext, key: str) -> dict[str, Any] | None:
    try:
        with contextlib.closing(ctx.storage.open(key)) as handle:
            data = json.loads(handle.read())
        return data if isinstance(data, dict) else None
    except ValueError:
        log.warning("verification report is not JSON; ignored", key=key)
        return None


def warm_up(ctx: JobContext) -> None:
    """Fill one job's gauges; storage errors are logged, never fatal (the next run retries)."""
    try:
        count = refresh_backups(ctx)
        refresh_verification(ctx)
        log.info("metrics loaded from the repository", job=ctx.name, backups=count)
    except Exception as exc:
        log.warning("could not load metrics from the repository", job=ctx.name, error=str(exc))
