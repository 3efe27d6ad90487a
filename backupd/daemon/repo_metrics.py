"""Metrics filled from the repository, so the daemon reports the truth whoever wrote it.

``backupd_backup_last_success_timestamp_seconds`` and its siblings come from the
newest committed manifest of each job; verification gauges from the newest
reports under ``<job>/verify/``. A report is the source whichever process wrote
it: the daemon lists each job's reports every ``daemon.repository_poll_interval``
(one LIST per job) and reads them again only when a new one has appeared, so a
failed ``backupd verify`` run from the CLI alerts without a restart. Storage is
the truth; nothing is cached here beyond the name of the newest report seen.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import structlog

from backupd.context import JobContext
from backupd.daemon import gaps as gap_watch
from backupd.jobrun import MetricsRecorder, Recorder
from backupd.manifest import Manifest
from backupd.settings import Settings
from backupd.status import REPORTS_SCANNED, read_report
from backupd.timeutil import parse_timestamp

log = structlog.get_logger(__name__)


def refresh_backups(ctx: JobContext, recorder: Recorder | None = None) -> int:
    """Backup gauges from the newest trusted manifest per method and type; returns the number of backups.

    With trusted keys, manifests no trusted key signed set no gauge (a forged "newest" backup must not
    silence the backup-too-old alert); they are counted in ``backupd_repository_untrusted_objects``."""
    entries = ctx.repository.entries()  # newest first, from the index
    recorder = recorder or MetricsRecorder()
    manifests = [m for m, trust in entries if trust is None or trust.status == "signed"]
    if ctx.settings.trusted_keys(ctx.name):
        recorder.untrusted_objects(ctx.name, len(entries) - len(manifests))
        for manifest, trust in entries:
            if trust is not None and trust.status != "signed":
                log.warning("backup not trusted", backup_id=manifest.backup_id, signature=str(trust),
                            problem=trust.problem)
    newest: dict[tuple[str, str], Manifest] = {}
    for manifest in manifests:
        newest.setdefault((manifest.method, manifest.backup_type), manifest)
    for manifest in newest.values():
        recorder.newest_backup(manifest)
    recorder.repository_backups(ctx.name, len(manifests))
    return len(manifests)


class VerificationReports:
    """The verification gauges of each job, from its newest reports; re-read only when a new one appears."""

    def __init__(self) -> None:
        self._newest: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def refresh(self, ctx: JobContext, *, force: bool = False) -> bool:
        """List ``<job>/verify/``; True when a new newest report was read into the gauges."""
        keys = sorted(ctx.repository.iter_reports(), reverse=True)
        newest = keys[0] if keys else None
        with self._lock:
            if not force and ctx.name in self._newest and self._newest[ctx.name] == newest:
                return False
        if keys:
            _apply(ctx, keys[:REPORTS_SCANNED])
        with self._lock:
            self._newest[ctx.name] = newest
        return bool(keys)

    def forget(self, job: str) -> None:
        with self._lock:
            self._newest.pop(job, None)


def _apply(ctx: JobContext, keys: list[str], recorder: Recorder | None = None) -> None:
    """Gauges from the newest readable report, and the newest passed one (newest first in ``keys``)."""
    recorder = recorder or MetricsRecorder()
    newest_seen = False
    for key in keys:
        report = _read_report(ctx, key)
        if report is None:
            continue
        if not newest_seen:
            newest_seen = True
            passed = report.get("result") == "passed"
            seconds = report.get("restore_seconds")
            recorder.verified(ctx.name, passed, seconds if isinstance(seconds, (int, float)) else None)
            if not passed:
                log.warning("the newest verification report says failed", key=key,
                            backup_id=report.get("backup_id"))
        if report.get("result") == "passed":
            with contextlib.suppress(KeyError, TypeError, ValueError):
                recorder.verification_passed(
                    ctx.name, parse_timestamp(report.get("finished_at") or report["started_at"]).timestamp())
            return


def _read_report(ctx: JobContext, key: str) -> dict[str, Any] | None:
    report = read_report(ctx, key)
    if report is None:
        log.warning("verification report is not a JSON object; ignored", key=key)
    return report


class RepositoryWatch:
    """A thread that fills each job's gauges at start (and for jobs a reload changed) and then
    polls the verification reports every ``interval`` seconds. Storage errors are logged, never fatal."""

    def __init__(self, settings: Callable[[], Settings], interval: float) -> None:
        self._settings = settings
        self.interval = interval
        self.reports = VerificationReports()
        self._warm: set[str] = set()  # jobs whose backup gauges still need loading
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="repository-watch", daemon=True)

    def start(self, jobs: list[str]) -> None:
        self.warm_up(jobs)
        self._thread.start()

    def warm_up(self, jobs: list[str]) -> None:
        """Load these jobs' gauges from the repository at the next turn (now)."""
        with self._cond:
            for job in jobs:
                self.reports.forget(job)
                self._warm.add(job)
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                warm, self._warm = self._warm, set()
            settings = self._settings()
            failed = {job for job in sorted(settings.jobs) if not self._refresh(settings, job, warm=job in warm)}
            with self._cond:
                if not self._warm and not self._stop:
                    self._cond.wait(self.interval)
                self._warm |= failed & warm  # gauges not loaded yet: retried at the next turn

    def _refresh(self, settings: Settings, job: str, *, warm: bool) -> bool:
        ctx = JobContext(settings, job)
        try:
            with structlog.contextvars.bound_contextvars(job=job):
                if warm:
                    count = refresh_backups(ctx)
                    log.info("metrics loaded from the repository", backups=count)
                    gap_watch.watch(ctx)  # gaps already in the archive count at start (the integrity rotation: later)
                if self.reports.refresh(ctx) and not warm:
                    log.info("new verification report read from the repository")
        except Exception as exc:
            log.warning("could not load metrics from the repository", job=job, error=str(exc))
            return False
        finally:
            ctx.close()
        return True
