"""backupd wal-fetch NAME DEST [--job JOB]: PostgreSQL's restore_command; exit 1 when NAME is not archived.

A segment an earlier call prefetched into the spool is delivered after reading
only ``daemon.state_dir`` from the configuration: replay asks for segments one
process at a time, so start-up is most of the cost of each.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from backupd import logs
from backupd.cli import quick
from backupd.errors import EXIT_FAILURE, UsageError
from backupd.paths import wal_fetch_spool

SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("wal-fetch", help="fetch one WAL file (PostgreSQL restore_command: wal-fetch %%f %%p)")
    parser.add_argument("name", help="the WAL file name (%%f)")
    parser.add_argument("dest", help="where to write it (%%p)")
    parser.add_argument("--job", help="the postgres job; may be left out when only one archives WAL")
    parser.set_defaults(handler=run, defer_logging=True)


def deliver_prefetched(args: argparse.Namespace, dest: Path) -> bool:
    """Move an already prefetched segment into place; False when there is none."""
    if not SEGMENT_RE.match(args.name):
        return False
    raw = quick.raw_config(args)
    job = quick.wal_job(raw, args.job)
    if not raw or not job:
        return False
    spooled = wal_fetch_spool(quick.state_dir(raw), job) / args.name
    try:
        os.replace(spooled, dest)  # same file system: atomic; else the full path copies
    except OSError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    dest = Path(args.dest).absolute()
    if not dest.parent.is_dir():
        raise UsageError(f"wal-fetch: {dest.parent}: no such directory")
    if deliver_prefetched(args, dest):
        return 0
    logs.configure(args.log_format, args.log_level)
    from backupd.cli.common import settings_from
    from backupd.cli.wal_push_cmd import wal_job
    from backupd.context import JobContext

    settings = settings_from(args)
    job = wal_job(settings, args.job, "wal-fetch")
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
