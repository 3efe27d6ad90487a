"""Proving backups: integrity (sha256, no key) and full (restore into scratch, measure)."""

from __future__ import annotations

import datetime as dt
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import structlog

from backupd import sealed
from backupd.context import JobContext
from backupd.driver import LogReach, PitrDrill, RestoreTarget
from backupd.errors import (BackupdError, BrokenChain, CryptoError, DriverError, IntegrityError, KeyMismatch,
                            UntrustedObject, UsageError)
from backupd.jobrun import JobRun, Recorder, process_recorder
from backupd.manifest import Manifest, PitrStart
from backupd.repository import LOG_KINDS
from backupd.restore import RepositorySource
from backupd.timeutil import format_timestamp, utcnow
from backupd.vouched import Vouched

log = structlog.get_logger(__name__)


@dataclass
class VerifyReport:
    job: str
    backup_id: str
    mode: str  # integrity | full
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not a failure (a forked WAL timeline)
    steps: list[dict[str, Any]] = field(default_factory=list)
    counts_expected: dict[str, int] = field(default_factory=dict)
    counts_found: dict[str, int] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    restore_seconds: float | None = None
    started_at: str = field(default_factory=lambda: format_timestamp(utcnow()))

    def fail(self, problem: str) -> None:
        self.ok = False
        self.problems.append(problem)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job, "backup_id": self.backup_id, "mode": self.mode,
            "result": "passed" if self.ok else "failed", "problems": self.problems, "notes": self.notes,
            "started_at": self.started_at, "finished_at": format_timestamp(utcnow()),
            "restore_seconds": self.restore_seconds, "steps": self.steps,
            "counts_expected": self.counts_expected, "counts_found": self.counts_found,
            "checks": self.checks,
        }

    #: What may carry text from the restored content (table names, check output, tool errors).
    SEALED_FIELDS = ("problems", "steps", "counts_expected", "counts_found", "checks")

    def to_stored(self, recipients: Sequence[object]) -> dict[str, Any]:
        """The repository's copy: result, times, backup id and counts in the clear, the rest sealed."""
        document = self.to_dict()
        document["summary"] = {
            "problems": len(self.problems), "tables_expected": len(self.counts_expected),
            "tables_found": len(self.counts_found), "checks": len(self.checks),
            "checks_failed": sum(1 for check in self.checks if not check.get("ok")),
        }
        return sealed.seal_fields(document, self.SEALED_FIELDS, recipients)


def check_integrity(ctx: JobContext, manifest: Manifest) -> VerifyReport:
    """Every object of the backup's chain (its full and parents too) against its manifest."""
    report = VerifyReport(ctx.name, manifest.backup_id, "integrity")
    started = time.monotonic()
    try:
        chain = ctx.repository.chain(manifest)
    except BrokenChain as exc:
        report.fail(str(exc))
        chain = [manifest]
    for member in chain:
        for problem in ctx.repository.check_integrity(member):
            report.fail(str(problem))
    step = {"step": "integrity", "seconds": round(time.monotonic() - started, 3),
            "objects": sum(len(m.objects) for m in chain), "bytes": sum(m.stored_size for m in chain)}
    if len(chain) > 1:
        step["chain"] = [m.backup_id for m in chain]
    report.steps.append(step)
    return report


def verify_full(ctx: JobContext, manifest: Manifest, scratch_root: Path | None = None, *,
                pitr_drill: bool = False) -> VerifyReport:
    """Integrity first, then a real restore into scratch; KeyMismatch means we could not run.

    With ``pitr_drill``, a passing verification is followed by a restore to a
    random moment inside the backup's PITR window (see ``run_drill``).
    """
    report = check_integrity(ctx, manifest)
    report.mode = "full"
    if not report.ok:
        return report
    identities = ctx.identities  # a bad key file is "could not run", raised before any verdict
    source = RepositorySource(ctx.repository, manifest, identities, str(ctx.identity_file),
                              ctx.repository.chain(manifest))  # whole: check_integrity passed
    scratch = Path(tempfile.mkdtemp(prefix=f"backupd-verify-{ctx.name}-", dir=scratch_root))
    started = time.monotonic()
    try:
        outcome = ctx.driver.verify(source, scratch, ctx.job.verify.checks)
    except KeyMismatch:
        raise
    except (CryptoError, IntegrityError) as exc:
        report.fail(str(exc))
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.restore_seconds = round(time.monotonic() - started, 3)
    report.steps.extend(outcome.steps)
    report.counts_expected = dict(manifest.row_counts)
    report.counts_found = dict(outcome.row_counts)
    for table in sorted(set(manifest.row_counts) | set(outcome.row_counts)):
        expected, found = manifest.row_counts.get(table), outcome.row_counts.get(table)
        if expected != found:
            report.fail(f"table {table}: {found} rows restored, the manifest says {expected}")
    for check in outcome.checks:
        report.checks.append({"check": check.name, "ok": check.ok, "detail": check.detail})
        if not check.ok:
            report.fail(f"check failed: {check.name}" + (f" ({check.detail})" if check.detail else ""))
    if pitr_drill and report.ok:
        run_drill(ctx, manifest, source, report, scratch_root)
    return report


def require_drill(ctx: JobContext, manifest: Manifest) -> tuple[PitrDrill, PitrStart]:
    """This job's driver as a PITR drill, and where the backup's logs begin; UsageError (exit 2) unless
    the driver and this backup support a drill."""
    driver = ctx.driver
    if not isinstance(driver, PitrDrill):
        raise UsageError(f"driver {ctx.job.driver} has no PITR drill (--pitr-drill needs archived logs: "
                         "postgres with method physical, or mysql, with archive_logs = true)")
    start = PitrStart.from_manifest(manifest)
    if start is None:
        raise UsageError(f"backup {manifest.backup_id} has no PITR window: --pitr-drill needs a backup taken with "
                         "archive_logs = true (for postgres, also method = physical)")
    return driver, start


def pitr_window(ctx: JobContext, manifest: Manifest, start: PitrStart) -> tuple[dt.datetime, dt.datetime | None]:
    """From the backup's consistent point to the arrival of the last log replay can use (a gap ends it)."""
    reach = ctx.log_reaches([manifest]).get(manifest.backup_id)
    return start.since, reach.until if reach is not None else None


def run_drill(ctx: JobContext, manifest: Manifest, source: RepositorySource, report: VerifyReport,
              scratch_root: Path | None = None) -> None:
    """Restore to a uniformly random moment of the PITR window; the driver must start it and query it."""
    drill, log_start = require_drill(ctx, manifest)
    start, end = pitr_window(ctx, manifest, log_start)
    step: dict[str, Any] = {"step": "pitr drill", "window_from": format_timestamp(start),
                            "window_to": format_timestamp(end) if end else None}
    if end is None or end <= start:
        step.update(result="failed", seconds=0.0)
        report.steps.append(step)
        report.fail(f"PITR drill: the window is empty: no log archived after the backup's consistent point "
                    f"{format_timestamp(start)} (is the log archiver running?)")
        return
    moment = start + (end - start) * random.SystemRandom().random()
    target = RestoreTarget("time", format_timestamp(moment), moment)
    step["target_time"] = format_timestamp(moment)
    scratch = Path(tempfile.mkdtemp(prefix=f"backupd-drill-{ctx.name}-", dir=scratch_root))
    started = time.monotonic()
    problems: list[str] = []
    try:
        outcome = drill.pitr_drill(source, scratch, target)
    except KeyMismatch:
        raise
    except (CryptoError, IntegrityError, DriverError) as exc:
        problems.append(f"PITR drill to {format_timestamp(moment)}: {exc}")
        outcome = None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    step["seconds"] = round(time.monotonic() - started, 3)
    if outcome is not None:
        step["steps"] = outcome.steps
        for check in outcome.checks:
            report.checks.append({"check": f"pitr drill: {check.name}", "ok": check.ok, "detail": check.detail})
            if not check.ok:
                problems.append(f"PITR drill to {format_timestamp(moment)}: check failed: {check.name}"
                                + (f" ({check.detail})" if check.detail else ""))
    step["result"] = "failed" if problems else "passed"
    report.steps.append(step)
    for problem in problems:
        report.fail(problem)


def check_continuity(ctx: JobContext, manifests: list[Manifest], report: VerifyReport,
                     identities: Sequence[object] = (), key_file: str | None = None, *,
                     record: bool = False, alone: bool = False) -> dict[str, LogReach | None]:
    """Logs must run unbroken from each backup that records log positions to the newest log.

    A gap breaks PITR past it, so each one fails the report, naming the missing
    file (the driver's ``log_reach`` finds them). Listing needs no key. ``alone``: the one backup
    named is checked by itself, its driver listing only the logs from its start on (PostgreSQL: the
    WAL folders its range needs), not the whole archive as a listing shared by many backups would.
    """
    started = time.monotonic()
    gaps: list[str] = []
    notes: list[str] = []
    if alone:  # one backup by itself: its driver lists only the logs from its start on, no shared listing
        from backupd.restore import RepositorySource

        reaches = {m.backup_id: ctx.driver.log_reach(RepositorySource(ctx.repository, m, identities, key_file,
                                                                      summary_ok=True))
                   for m in manifests if PitrStart.recorded(m)}
    else:
        reaches = ctx.log_reaches(manifests, identities, key_file, record=record)  # one listing for them all
    checked = len(reaches)
    for reach in reaches.values():
        if reach is not None:
            gaps.extend(gap for gap in reach.missing if gap not in gaps)
            notes.extend(note for note in reach.notes if note not in notes)
    for gap in gaps:
        report.fail(f"log archive gap: {gap}")  # the daemon's GapWatch counts it in backupd_archive_gaps_total
    report.notes.extend(notes)
    if checked:
        report.steps.append({"step": "log_continuity", "backups": checked, "gaps": gaps, "notes": notes,
                             "seconds": round(time.monotonic() - started, 3)})
    return reaches


def check_log_signatures(ctx: JobContext, report: VerifyReport) -> None:
    """With trusted keys, every archived log object of the job must carry a trusted signature over its name
    and recorded sha256; each one that does not fails the report, naming it (replay would refuse it)."""
    if not ctx.settings.trusted_keys(ctx.name):
        return
    started = time.monotonic()
    untrusted, checked = untrusted_logs(ctx)
    for line in untrusted:
        report.fail(line)
    report.steps.append({"step": "log_signatures", "untrusted": len(untrusted), "checked": checked,
                         "seconds": round(time.monotonic() - started, 3)})


def untrusted_logs(ctx: JobContext) -> tuple[list[str], int]:
    """A line for each archived log of the job no trusted key vouches for, and how many signatures were read
    (only logs new or changed since the last check: ``backupd.vouched``); nothing without trusted keys."""
    trusted = ctx.settings.trusted_keys(ctx.name)
    if not trusted:
        return [], 0
    archives = [ctx.listed_archive(kind) for kind in LOG_KINDS]  # the command's one listing of each
    vouched = Vouched(ctx.state_dir, ctx.storage.location, ctx.name, trusted)
    try:
        return [line for archive in archives for line in archive.untrusted(vouched)], vouched.checked
    finally:
        vouched.close()


def save_report(ctx: JobContext, report: VerifyReport) -> str | None:
    try:
        return ctx.repository.write_report(report.started_at, report.backup_id, report.to_stored(ctx.recipients))
    except BackupdError as exc:
        log.warning("could not store the verification report", error=str(exc))
        return None


def record_metrics(report: VerifyReport, recorder: Recorder | None = None) -> None:
    """The verification gauges from ``report`` (through the process's recorder by default)."""
    recorder = recorder if recorder is not None else process_recorder()
    recorder.verified(report.job, report.ok, report.restore_seconds)
    if report.ok:
        recorder.verification_passed(report.job, utcnow().timestamp())


def unusable_reports(ctx: JobContext, unusable: list[tuple[str, IntegrityError]]) -> list[VerifyReport]:
    """A manifest that cannot be read is a failed integrity check of its backup."""
    reports = []
    for bad_id, exc in unusable:
        reports.append(VerifyReport(ctx.name, bad_id, "integrity"))
        reports[-1].fail(str(exc))
    return reports


def run_verification(ctx: JobContext, backup_id: str | None = None, *, integrity_only: bool = False,
                     pitr_drill: bool = False, run: JobRun | None = None) -> list[VerifyReport]:
    """What ``backupd verify`` and the daemon's verify schedule run: reports stored, metrics set.

    Full mode verifies one backup (default the newest trusted one); integrity mode every
    backup unless one is named. With trusted keys, a manifest no trusted key signed is a
    failed report (exit 3), whichever mode. Raises (exit 1) when verification cannot run.
    """
    with ctx.one_listing():  # the log archive is listed once, however many backups record logs
        return _run_verification(ctx, backup_id, integrity_only=integrity_only, pitr_drill=pitr_drill,
                                 run=JobRun.of(ctx, "verify", run))


def _run_verification(ctx: JobContext, backup_id: str | None, *, integrity_only: bool,
                      pitr_drill: bool, run: JobRun) -> list[VerifyReport]:
    repo = ctx.repository
    named: Manifest | None = None
    if backup_id:
        try:
            named = repo.load_manifest(backup_id)  # by key, once
        except UntrustedObject as exc:  # refused before anything of it is read
            report = unusable_reports(ctx, [(backup_id, exc)])[0]
            report.mode = "integrity" if integrity_only else "full"
            if not integrity_only:
                save_report(ctx, report)
                record_metrics(report, run.recorder)
            return [report]
    if integrity_only:
        if named is not None:
            manifests, unusable = [named], list[tuple[str, IntegrityError]]()
        else:
            manifests, unusable = repo.scan_manifests()
            if not manifests and not unusable:
                repo.resolve(None)  # raises "no backups"
        reports = []
        reaches: dict[str, LogReach | None] = {}
        taken_at = utcnow()
        for chosen in manifests:
            try:
                manifest = repo.load_full(chosen)  # the index's summary -> the manifest itself, by key
            except IntegrityError as exc:
                reports.extend(unusable_reports(ctx, [(chosen.backup_id, exc)]))
                continue
            reports.append(check_integrity(ctx, manifest))
            reaches.update(check_continuity(ctx, [manifest], reports[-1], alone=named is not None))
        if reports and not backup_id:  # the whole archive once, with the newest backup's report
            check_log_signatures(ctx, reports[0])
            ctx.record_reaches(manifests, reaches, taken_at)  # the next ``list`` lists only what follows
        reports.extend(unusable_reports(ctx, unusable))
        return reports
    manifest = named if named is not None else repo.resolve(None)
    if pitr_drill:
        require_drill(ctx, manifest)  # exit 2 before any restore
    kept, unusable = repo.scan_manifests()
    for bad_id, problem in unusable:
        log.warning("backup skipped: its manifest is unusable", job=ctx.name, backup_id=bad_id, error=str(problem))
    untrusted = [] if backup_id else [str(e) for _, e in unusable if isinstance(e, UntrustedObject)]
    report = verify_full(ctx, manifest, pitr_drill=pitr_drill)
    check_continuity(ctx, kept, report, record=True)  # from each kept backup to the newest log
    check_log_signatures(ctx, report)
    for line in untrusted:  # a forged "newest" backup was skipped; it fails verification all the same
        report.fail(line)
    save_report(ctx, report)
    record_metrics(report, run.recorder)
    return [report]
