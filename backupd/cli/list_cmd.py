"""backupd list [JOB] [--json]: backups in the repository, newest first."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from backupd.catalog import Catalog
from backupd.cli.common import human_size, print_json, print_table, settings_from
from backupd.context import JobContext
from backupd.manifest import Manifest
from backupd.timeutil import format_timestamp, parse_timestamp


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("list", help="list backups, newest first")
    parser.add_argument("job", nargs="?")
    parser.add_argument("--json", action="store_true", help="a stable JSON document instead of a table")
    parser.set_defaults(handler=run)


def pitr_range(manifest: Manifest, newest_log: dt.datetime | None) -> dict[str, str] | None:
    """From the backup's consistent point to the newest archived log; None without logs."""
    pitr = manifest.metadata.get("pitr")
    if not isinstance(pitr, dict) or "from" not in pitr:
        return None
    start = parse_timestamp(pitr["from"])
    # the window ends at the newest archived log, never before it starts (no log archived since the backup)
    until = format_timestamp(newest_log.replace(microsecond=0)) if newest_log and newest_log > start else pitr["from"]
    return {"from": pitr["from"], "to": until, "log_kind": pitr.get("log_kind", "")}


def newest_log_time(ctx: JobContext, manifests: list[Manifest]) -> dt.datetime | None:
    kinds = {m.metadata["pitr"].get("log_kind") for m in manifests if isinstance(m.metadata.get("pitr"), dict)}
    times = [obj.modified for kind in kinds if kind
             for obj in ctx.storage.list(f"{ctx.name}/{kind}/") if obj.modified is not None]
    return max(times, default=None)


def summary(manifest: Manifest, newest_log: dt.datetime | None = None) -> dict[str, Any]:
    return {
        "backup_id": manifest.backup_id,
        "job": manifest.job,
        "driver": manifest.driver,
        "method": manifest.method,
        "started_at": format_timestamp(manifest.started_at),
        "finished_at": format_timestamp(manifest.finished_at),
        "raw_size": manifest.raw_size,
        "stored_size": manifest.stored_size,
        "pitr": pitr_range(manifest, newest_log),
    }


def _short(moment: dt.datetime) -> str:
    return format_timestamp(moment.replace(microsecond=0))


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    jobs = [args.job] if args.job else sorted(settings.jobs)
    for job in jobs:
        settings.job(job)
    catalog = Catalog(settings.daemon.state_dir)
    manifests: list[Manifest] = []
    newest_logs: dict[str, dt.datetime | None] = {}
    try:
        for job in jobs:
            ctx = JobContext(settings, job)
            try:
                found = catalog.manifests(ctx.repository)
                newest_logs[job] = newest_log_time(ctx, found)
                manifests.extend(found)
            finally:
                ctx.close()
    finally:
        catalog.close()
    manifests.sort(key=lambda m: m.finished_at, reverse=True)
    if args.json:
        print_json({"backups": [summary(m, newest_logs.get(m.job)) for m in manifests]})
        return 0
    rows = []
    for m in manifests:
        pitr = pitr_range(m, newest_logs.get(m.job))
        window = f"{pitr['from']} .. {pitr['to']}" if pitr else "-"
        rows.append([m.backup_id, m.job, m.method, _short(m.started_at), _short(m.finished_at),
                     human_size(m.raw_size), human_size(m.stored_size), window])
    print_table(["ID", "JOB", "METHOD", "STARTED", "FINISHED", "RAW", "STORED", "PITR"], rows)
    return 0
