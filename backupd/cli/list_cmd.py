"""backupd list [JOB] [--json]: backups in the repository, newest first."""

from __future__ import annotations

import argparse
from typing import Any

from backupd.catalog import Catalog
from backupd.cli.common import human_size, print_json, print_table, settings_from
from backupd.context import JobContext
from backupd.manifest import Manifest
from backupd.timeutil import format_timestamp


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("list", help="list backups, newest first")
    parser.add_argument("job", nargs="?")
    parser.add_argument("--json", action="store_true", help="a stable JSON document instead of a table")
    parser.set_defaults(handler=run)


def summary(manifest: Manifest) -> dict[str, Any]:
    return {
        "backup_id": manifest.backup_id,
        "job": manifest.job,
        "driver": manifest.driver,
        "method": manifest.method,
        "started_at": format_timestamp(manifest.started_at),
        "finished_at": format_timestamp(manifest.finished_at),
        "raw_size": manifest.raw_size,
        "stored_size": manifest.stored_size,
        "pitr": manifest.metadata.get("pitr"),
    }


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    jobs = [args.job] if args.job else sorted(settings.jobs)
    for job in jobs:
        settings.job(job)
    catalog = Catalog(settings.daemon.state_dir)
    manifests: list[Manifest] = []
    try:
        for job in jobs:
            ctx = JobContext(settings, job)
            try:
                manifests.extend(catalog.manifests(ctx.repository))
            finally:
                ctx.close()
    finally:
        catalog.close()
    manifests.sort(key=lambda m: m.finished_at, reverse=True)
    if args.json:
        print_json({"backups": [summary(m) for m in manifests]})
        return 0
    rows = []
    for m in manifests:
        pitr = m.metadata.get("pitr") or {}
        window = f"{pitr.get('from', '?')} .. {pitr.get('to', '?')}" if pitr else "-"
        rows.append([m.backup_id, m.job, m.method, format_timestamp(m.started_at), format_timestamp(m.finished_at),
                     human_size(m.raw_size), human_size(m.stored_size), window])
    print_table(["ID", "JOB", "METHOD", "STARTED", "FINISHED", "RAW", "STORED", "PITR"], rows)
    return 0
