"""backupd list [JOB] [--json]: backups in the repository, newest first."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from backupd import reaches as recorded_reaches
from backupd.cli.common import human_size, print_json, print_table, settings_from
from backupd.context import JobContext
from backupd.driver import LogReach
from backupd.manifest import Manifest, PitrStart
from backupd.signing import Trust
from backupd.timeutil import format_timestamp


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("list", help="list backups, newest first")
    parser.add_argument("job", nargs="?")
    parser.add_argument("--json", action="store_true", help="a stable JSON document instead of a table")
    parser.set_defaults(handler=run)


def pitr_range(manifest: Manifest, reach: LogReach | None) -> dict[str, Any] | None:
    """From the backup's consistent point to the last log replay can use (the first gap ends it); None without logs."""
    pitr = PitrStart.from_manifest(manifest)
    if pitr is None:
        return None
    start = pitr.since
    until = reach.until if reach is not None and reach.until is not None else start
    return {"from": format_timestamp(start), "to": format_timestamp(max(until, start)),
            "log_kind": pitr.log_kind, "broken_at": reach.first_missing if reach else None,
            "notes": list(reach.notes) if reach else []}


def signature(trust: Trust | None) -> str | None:
    """``signed-by COMMENT``, ``unsigned`` or ``BAD``; None when the job has no trusted keys (not checked)."""
    return None if trust is None else str(trust)


def summary(manifest: Manifest, reach: LogReach | None = None, trust: Trust | None = None) -> dict[str, Any]:
    return {
        "backup_id": manifest.backup_id,
        "job": manifest.job,
        "driver": manifest.driver,
        "method": manifest.method,
        "type": manifest.backup_type,
        "parent": manifest.parent,
        "started_at": format_timestamp(manifest.started_at),
        "finished_at": format_timestamp(manifest.finished_at),
        "raw_size": manifest.raw_size,
        "stored_size": manifest.stored_size,
        "pitr": pitr_range(manifest, reach),
        "signature": signature(trust),
    }


def _short(moment: dt.datetime) -> str:
    return format_timestamp(moment.replace(microsecond=0))


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    jobs = [args.job] if args.job else sorted(settings.jobs)
    for job in jobs:
        settings.job(job)
    manifests: list[Manifest] = []
    reaches: dict[str, LogReach | None] = {}
    trust: dict[tuple[str, str], Trust | None] = {}
    summaries: list[dict[str, str]] = []  # the log summaries the windows come from (``backupd.reaches``)
    for job in jobs:
        ctx = JobContext(settings, job)
        try:
            entries = ctx.repository.entries()  # one read of the index; untrusted ones too: marked, not hidden
            found: list[Manifest] = [manifest for manifest, _ in entries]
            trust.update(((m.job, m.backup_id), t) for m, t in entries)
            found_reaches, used = recorded_reaches.for_list(ctx, found)  # one listing of the logs since the last check
            reaches.update(found_reaches)
            summaries.extend({"job": job, "log_kind": kind, "checkpoint": summary.checkpoint,
                              "taken_at": format_timestamp(summary.taken_at)} for kind, summary in sorted(used.items()))
            manifests.extend(found)
        finally:
            ctx.close()
    manifests.sort(key=lambda m: m.finished_at, reverse=True)
    if args.json:
        print_json({"backups": [summary(m, reaches.get(m.backup_id), trust.get((m.job, m.backup_id)))
                                for m in manifests],
                    "log_summaries": summaries})
        return 0
    rows = []
    for m in manifests:
        pitr = pitr_range(m, reaches.get(m.backup_id))
        window = f"{pitr['from']} .. {pitr['to']}" if pitr else "-"
        if pitr and pitr["broken_at"]:
            window += f" (gap: {pitr['broken_at']} missing)"
        rows.append([m.backup_id, m.job, m.method, m.backup_type, m.parent or "-", _short(m.started_at),
                     _short(m.finished_at), human_size(m.raw_size), human_size(m.stored_size), window,
                     signature(trust.get((m.job, m.backup_id))) or "-"])
    print_table(["ID", "JOB", "METHOD", "TYPE", "PARENT", "STARTED", "FINISHED", "RAW", "STORED", "PITR",
                 "SIGNATURE"], rows)
    notes = {(m.job, note) for m in manifests for note in (reaches.get(m.backup_id) or LogReach()).notes}
    for job, note in sorted(notes):
        print(f"warning: job {job}: {note}")
    return 0
