"""backupd wal-fetch NAME DEST [--job JOB]: PostgreSQL's restore_command; exit 1 when NAME is not archived."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backupd.cli.common import settings_from
from backupd.cli.wal_push_cmd import wal_job
from backupd.context import JobContext
from backupd.errors import EXIT_FAILURE, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("wal-fetch", help="fetch one WAL file (PostgreSQL restore_command: wal-fetch %%f %%p)")
    parser.add_argument("name", help="the WAL file name (%%f)")
    parser.add_argument("dest", help="where to write it (%%p)")
    parser.add_argument("--job", help="the postgres job; may be left out when only one archives WAL")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    job = wal_job(settings, args.job, "wal-fetch")
    dest = Path(args.dest).absolute()
    if not dest.parent.is_dir():
        raise UsageError(f"wal-fetch: {dest.parent}: no such directory")
    ctx = JobContext(settings, job)
    try:
        fetch = getattr(ctx.driver, "wal_fetch", None)
        if fetch is None:
            raise UsageError(f"job {job} (driver {ctx.job.driver}) does not archive WAL")
        if fetch(args.name, dest, ctx.identities, str(ctx.identity_file)):
            return 0
    finally:
        ctx.close()
    print(f"backupd: {args.name}: not in the archive of job {job}", file=sys.stderr)
    return EXIT_FAILURE
