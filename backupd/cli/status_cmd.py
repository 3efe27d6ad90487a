"""backupd status [JOB] [--json]: per job, what the repository holds and what needs an operator."""

from __future__ import annotations

import argparse
import re
from typing import Any

from backupd.cli.common import human_size, print_json, settings_from
from backupd.context import JobContext
from backupd.errors import EXIT_FAILURE, BackupdError
from backupd.status import daemon_status, job_status
from backupd.timeutil import utcnow


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("status", help="per job: newest backups, archive, PITR window, verification, problems")
    parser.add_argument("job", nargs="?")
    parser.add_argument("--json", action="store_true", help="a stable JSON document instead of text")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    jobs = [args.job] if args.job else sorted(settings.jobs)
    for job in jobs:
        settings.job(job)
    now = utcnow()
    daemon: dict[str, Any] | None = None
    statuses = []
    for index, job in enumerate(jobs):
        ctx = JobContext(settings, job)
        try:
            if index == 0:
                daemon = daemon_status(ctx)
            statuses.append(job_status(ctx, daemon, now))
        except BackupdError as exc:  # one unreadable repository does not hide the others
            statuses.append({"job": job, "state": "error", "problems": [f"cannot read the repository: {exc}"],
                             "warnings": []})
        finally:
            ctx.close()
    if args.json:
        print_json({"jobs": statuses})
    else:
        text = "\n\n".join(_text(status) for status in statuses)
        print(re.sub(r"(T\d\d:\d\d:\d\d)\.\d+Z", r"\1Z", text))  # whole seconds read better
    unreadable = any(s["problems"] and "backups" not in s for s in statuses)
    return EXIT_FAILURE if unreadable else 0


def _text(s: dict[str, Any]) -> str:
    if "backups" not in s:
        return f"job {s['job']}: {s['state']}\n  " + "\n  ".join(s["problems"])
    lines = [f"job {s['job']} ({s['driver']}, {s['storage']}): {s['state']}"]

    def row(label: str, value: str) -> None:
        lines.append(f"  {label:<14}{value}")

    backups = s["backups"]
    row("backups", f"{backups['count']}" + (f" (+{len(backups['partial'])} without manifest: "
                                            f"{', '.join(backups['partial'])})" if backups["partial"] else ""))
    for b in backups["newest"]:
        row(f"newest {b['type']}", f"{b['backup_id']}  {b['method']}  finished {b['finished_at']}  "
                                   f"{human_size(b['stored_size'])} stored")
    run = s["last_run"]
    if run:
        row("last run", f"{run['result']} at {run.get('at', '-')}" + (f": {run['error']}" if run.get("error") else ""))
    archive = s["archive"]
    if archive:
        row("archive", f"{archive['kind']}: {archive['count']} file(s)")
        row("  oldest", f"{archive['oldest']['name']}  stored {archive['oldest']['stored_at'] or '-'}")
        row("  newest", f"{archive['newest']['name']}  stored {archive['newest']['stored_at'] or '-'}")
    else:
        row("archive", "no archived logs")
    lag = s["archive_lag_seconds"]
    row("archive lag", lag if isinstance(lag, str) else "-" if lag is None else f"{lag:.1f} s")
    if isinstance(s["archivers"], list):
        for a in s["archivers"]:
            row("archiver", f"{a['name']}: {a['state']}" + (f" ({a['last_error']})" if a.get("last_error") else ""))
    pitr = s["pitr"]
    if pitr:
        breaks = pitr["breaks"]
        broken = breaks if isinstance(breaks, str) else ("broken: " + "; ".join(breaks) if breaks else "unbroken")
        row("PITR window", f"{pitr['from']} .. {pitr['to']} ({broken})")
    else:
        row("PITR window", "none (no backup with archived logs)")
    v = s["verification"]
    if v:
        extra = f", restored in {v['restore_seconds']:.2f} s" if isinstance(v.get("restore_seconds"), (int, float)) else ""
        row("verification", f"{v['result']} {v.get('finished_at') or v.get('started_at')} "
                            f"(backup {v.get('backup_id')}, {v.get('mode')}{extra})")
        if v["result"] != "passed":
            row("  last passed", v["last_passed_at"] or "never")
    else:
        row("verification", "never")
    row("pins", ", ".join(s["pins"]) or "none")
    untrusted = s["untrusted_objects"]
    row("untrusted", untrusted if isinstance(untrusted, str) else f"{len(untrusted)} backup(s)" if untrusted else "none")
    copies = s["lagging_copies"]
    row("copies", copies if isinstance(copies, str) else "; ".join(
        f"{c['storage']}: " + ("not reachable" if not c["reachable"] else
                               f"{c['behind_objects']} object(s) behind since {c['oldest_missing']}"
                               if c["behind_objects"] else "up to date") for c in copies))
    for problem in s["problems"]:
        lines.append(f"  PROBLEM: {problem}")
    for warning in s["warnings"]:
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)
