"""backupd backup JOB [--method M] [--type full|diff|incr]: one backup now; prints its id."""

from __future__ import annotations

import argparse

from backupd.backup import run_backup
from backupd.chain import BACKUP_TYPES
from backupd.cli.common import with_job
from backupd.context import JobContext


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("backup", help="take one backup now, in the foreground")
    parser.add_argument("job")
    parser.add_argument("--method", help="override the job's method (logical, physical)")
    parser.add_argument("--type", dest="backup_type", choices=BACKUP_TYPES, default=None,
                        help="full (the default), diff (what changed since the newest full) or incr (since the "
                             "newest backup); diff and incr for method physical on drivers that support them")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long for a running backup of the job to finish (default: fail at once)")
    parser.set_defaults(handler=run)


@with_job
def run(args: argparse.Namespace, ctx: JobContext) -> int:
    manifest = run_backup(ctx, args.method, args.backup_type, wait=args.wait, run=getattr(args, "run", None))
    print(manifest.backup_id)
    return 0
