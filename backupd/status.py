"""What ``backupd status`` says about a job: read from its repository, so it works on a host that
never saw the job (the starting point of a disaster recovery), plus what the local daemon knows
live (the archive lag, its log archivers) when one runs on this host.

Per job: the newest backup of each method and type; the newest run's result and error (the
run record ``backupd.runstate`` keeps in the repository); the archived logs' oldest and newest
and the PITR window they give, with its breaks (the driver's ``log_reach``); the newest
verification report; pins; backups left without a manifest; with several repositories, what each
lacks (``backupd.catchup``). ``problems`` lists what needs an operator; ``state``
sums it up: ``ok``, ``warning`` (never verified, no backup yet) or ``error``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Sequence, get_args

from backupd.catchup import lagging
from backupd.context import JobContext
from backupd.control import request, socket_path
from backupd.errors import BackupdError, ConfigError, CryptoError, IntegrityError
from backupd.logarchive import Kind, LogObject
from backupd.manifest import Manifest, PitrStart
from backupd.pins import Pins
from backupd.runstate import UnreadableRecord, last_run
from backupd.timeutil import format_timestamp, parse_timestamp


NOT_AVAILABLE = "not available"
REPORTS_SCANNED = 50  # how far back to look for the newest passed verification
DAEMON_TIMEOUT = 5.0


def read_report(ctx: JobContext, key: str, identities: Sequence[object] = ()) -> dict[str, Any] | None:
    """One verification report, its sealed details opened with ``identities`` where they can be
    (else left sealed); None when it is not a JSON object."""
    try:
        return ctx.repository.read_report(key, identities)
    except IntegrityError:
        if not identities:
            return None
    return read_report(ctx, key)


def _identities(ctx: JobContext) -> Sequence[object]:
    """The job's private keys where this host holds them (the details of a report are sealed to them); else none."""
    try:
        return ctx.identities
    except (ConfigError, CryptoError):
        return ()


def daemon_status(ctx: JobContext) -> dict[str, Any] | None:
    """The local daemon's live view (``status`` on its control socket), or None when none runs here."""
    try:
        reply = request(socket_path(ctx.state_dir), {"op": "status"}, timeout=DAEMON_TIMEOUT)
    except OSError:
        return None
    return reply if reply and reply.get("ok") else None


def job_status(ctx: JobContext, daemon: dict[str, Any] | None, now: dt.datetime) -> dict[str, Any]:
    with ctx.one_listing():  # the log archive's counts and its PITR breaks from one listing
        return _job_status(ctx, daemon, now)


def _job_status(ctx: JobContext, daemon: dict[str, Any] | None, now: dt.datetime) -> dict[str, Any]:
    repo = ctx.repository
    entries = repo.entries()  # newest first, from the index
    manifests = [m for m, trust in entries if trust is None or trust.status == "signed"]
    untrusted = [f"{m.backup_id}: {trust} ({trust.problem})" for m, trust in entries
                 if trust is not None and trust.status != "signed"]
    _, partial = repo.scan()
    logs = _archive(ctx, now)
    status: dict[str, Any] = {
        "job": ctx.name,
        "driver": ctx.job.driver,
        "storage": ctx.storage.location,
        "backups": {"count": len(manifests), "partial": partial, "newest": _newest_backups(manifests)},
        "last_run": _last_run(ctx),
        "archive": logs,
        "archive_lag_seconds": _lag(ctx.name, daemon),
        "archivers": [a for a in (daemon or {}).get("archivers", []) if a.get("job") == ctx.name]
        if daemon else f"{NOT_AVAILABLE}: no daemon runs on this host",
        "pitr": _pitr(ctx, manifests, logs),
        "verification": _verification(ctx),
        "pins": sorted(Pins(ctx.storage, ctx.name).ids()),
        "untrusted_objects": untrusted if repo.trusted
        else f"{NOT_AVAILABLE}: the job has no trusted keys (signatures are not checked)",
        "lagging_copies": lagging(ctx) if len(ctx.job.storages) > 1
        else f"{NOT_AVAILABLE}: the job has one repository",
    }
    status["problems"], status["warnings"] = _problems(status, manifests)
    status["state"] = "error" if status["problems"] else "warning" if status["warnings"] else "ok"
    return status


def _newest_backups(manifests: list[Manifest]) -> list[dict[str, Any]]:
    """The newest backup of each method and type."""
    newest: dict[tuple[str, str], Manifest] = {}
    for manifest in manifests:
        newest.setdefault((manifest.method, manifest.backup_type), manifest)
    return [{"method": method, "type": kind, "backup_id": m.backup_id, "result": "success",
             "started_at": format_timestamp(m.started_at), "finished_at": format_timestamp(m.finished_at),
             "raw_size": m.raw_size, "stored_size": m.stored_size}
            for (method, kind), m in sorted(newest.items())]


def _last_run(ctx: JobContext) -> dict[str, Any] | None:
    try:
        record = last_run(ctx.storage, ctx.state_dir, ctx.name)
    except UnreadableRecord as exc:
        return {"result": "unknown", "error": str(exc)}
    if record is None:
        return None
    return {"result": record.result, "at": format_timestamp(record.at), "backup_id": record.backup_id,
            "error": record.error}


def _archive(ctx: JobContext, now: dt.datetime) -> dict[str, Any] | None:
    """The archived logs of the job (WAL, binlogs or oplog slices): how many, the oldest and newest."""
    for kind in get_args(Kind):
        logs = ctx.listed_archive(kind).list()
        if not logs:
            continue
        order = sorted(logs, key=lambda o: (o.modified or dt.datetime.min.replace(tzinfo=dt.timezone.utc), o.name))
        newest = order[-1]
        return {"kind": kind, "count": len(logs), "oldest": _log(order[0]), "newest": _log(newest),
                "newest_age_seconds": round((now - newest.modified).total_seconds(), 3) if newest.modified else None}
    return None


def _log(obj: LogObject) -> dict[str, Any]:
    return {"name": obj.name, "stored_at": format_timestamp(obj.modified) if obj.modified else None}


def _lag(job: str, daemon: dict[str, Any] | None) -> float | str | None:
    if daemon is None:
        return f"{NOT_AVAILABLE}: no daemon runs on this host"
    return (daemon.get("archive_lag") or {}).get(job)


def _pitr(ctx: JobContext, manifests: list[Manifest], logs: dict[str, Any] | None) -> dict[str, Any] | None:
    """From the oldest backup's consistent point to the last log replay from the newest backup can use,
    with the gaps that break it (the driver's ``log_reach``, from the oldest backup on)."""
    starts = {m.backup_id: found for m in manifests if (found := PitrStart.from_manifest(m)) is not None}
    with_pitr = [m for m in manifests if m.backup_id in starts]
    if not with_pitr:
        return None
    oldest = min(with_pitr, key=lambda m: m.finished_at)
    newest_backup = max(with_pitr, key=lambda m: m.finished_at)
    start = starts[oldest.backup_id].since
    newest = (logs or {}).get("newest") or {}
    window: dict[str, Any] = {"from": format_timestamp(start), "to": newest.get("stored_at") or format_timestamp(start)}
    try:
        reaches = ctx.log_reaches([oldest, newest_backup])
    except BackupdError as exc:
        window["breaks"] = f"{NOT_AVAILABLE}: {exc}"
        return window
    first, last = reaches.get(oldest.backup_id), reaches.get(newest_backup.backup_id)
    if last is not None and last.until is not None:
        window["to"] = format_timestamp(max(last.until, start))
    window["breaks"] = list(first.missing) if first is not None else []
    window["notes"] = list(first.notes) if first is not None else []
    return window


def _verification(ctx: JobContext) -> dict[str, Any] | None:
    keys = sorted(ctx.repository.iter_reports(), reverse=True)[:REPORTS_SCANNED]
    newest: dict[str, Any] | None = None
    identities = _identities(ctx) if keys else ()
    for key in keys:
        report = read_report(ctx, key, identities if newest is None else ())  # only the newest's details are shown
        if report is None:
            continue
        if newest is None:
            newest = {name: report.get(name) for name in ("result", "mode", "backup_id", "started_at",
                                                            "finished_at", "restore_seconds")}
            problems = report.get("problems")
            newest["problems"] = [str(p) for p in problems] if isinstance(problems, list) else []
            newest["report"] = key
            newest["last_passed_at"] = None
        if report.get("result") == "passed":
            newest["last_passed_at"] = report.get("finished_at") or report.get("started_at")
            break
    return newest


def _problems(status: dict[str, Any], manifests: list[Manifest]) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    warnings: list[str] = []
    run = status["last_run"]
    newest_start = manifests[0].started_at if manifests else None
    if run and run["result"] == "failure":
        when = parse_timestamp(run["at"])
        if newest_start is None or when >= newest_start:
            problems.append(f"the newest backup run failed at {run['at']}" + (f": {run['error']}" if run["error"] else ""))
    elif run and run["result"] == "unknown":
        problems.append(run["error"])
    if not manifests:
        warnings.append("no backup yet")
    if isinstance(status["untrusted_objects"], list) and status["untrusted_objects"]:
        problems.append(f"{len(status['untrusted_objects'])} backup(s) not signed by a trusted key: "
                        + "; ".join(status["untrusted_objects"]))
    pitr = status["pitr"]
    if pitr and isinstance(pitr.get("breaks"), list) and pitr["breaks"]:
        problems.append(f"the PITR window is broken: {'; '.join(pitr['breaks'])}")
    verification = status["verification"]
    if verification is None:
        if manifests:
            warnings.append("never verified")
    elif verification.get("result") != "passed":
        problems.append(f"the newest verification ({verification.get('backup_id')}, "
                        f"{verification.get('finished_at') or verification.get('started_at')}) failed"
                        + (f": {'; '.join(verification['problems'])}" if verification["problems"] else ""))
    for copy in status["lagging_copies"] if isinstance(status["lagging_copies"], list) else []:
        if not copy["reachable"]:
            problems.append(f"repository {copy['storage']} is not reachable: {copy['error']}")
        elif copy["behind_objects"]:
            warnings.append(f"repository {copy['storage']} lacks {copy['behind_objects']} object(s), the oldest "
                            f"from {copy['oldest_missing']} (the daemon catches it up; `backupd copy` by hand)")
    for archiver in status["archivers"] if isinstance(status["archivers"], list) else []:
        if archiver.get("state") not in ("starting", "running"):
            problems.append(f"log archiver {archiver.get('name')} is {archiver.get('state')}"
                            + (f": {archiver['last_error']}" if archiver.get("last_error") else ""))
    return problems, warnings
