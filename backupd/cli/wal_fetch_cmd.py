"""backupd wal-fetch NAME DEST [--job JOB]: PostgreSQL's restore_command; exit 1 when NAME is not archived.

Replay asks for one file at a time, so the common case never gets here: the
fast path (``backupd.cli.quick``) renames a file the background prefetcher has
spooled. This is the full command, for everything else: it fetches from the
archive itself and makes sure a prefetcher is at work for the next requests.
``--prefetch-from NAME`` runs the prefetcher itself (started detached, never by hand).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from backupd import logs, spool
from backupd.cli import quick
from backupd.errors import EXIT_FAILURE, UsageError

if TYPE_CHECKING:
    from backupd.context import JobContext
    from backupd.driver import WalArchiving


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("wal-fetch", help="fetch one WAL file (PostgreSQL restore_command: wal-fetch %%f %%p)")
    parser.add_argument("name", nargs="?", help="the WAL file name (%%f)")
    parser.add_argument("dest", nargs="?", help="where to write it (%%p)")
    parser.add_argument("--job", help="the postgres job; may be left out when only one archives WAL")
    group = parser.add_mutually_exclusive_group()  # the background prefetcher's own options
    group.add_argument("--prefetch-from", metavar="NAME", help=argparse.SUPPRESS)
    group.add_argument("--prefetch-after", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)
    parser.set_defaults(handler=run, defer_logging=True)


def run(args: argparse.Namespace) -> int:
    prefetching = args.prefetch_from or args.prefetch_after
    if not prefetching:
        if args.name is None or args.dest is None:
            raise UsageError("wal-fetch: NAME and DEST are required (restore_command = 'backupd wal-fetch %f %p')")
        dest = Path(args.dest).absolute()
        if not dest.parent.is_dir():
            raise UsageError(f"wal-fetch: {dest.parent}: no such directory")
    logs.configure(args.log_format, args.log_level)
    from backupd.cli.common import settings_from
    from backupd.cli.wal_push_cmd import wal_job
    from backupd.context import JobContext
    from backupd.driver import WalArchiving

    settings = settings_from(args)
    job = wal_job(settings, args.job, "wal-fetch")
    ctx = JobContext(settings, job)
    try:
        driver = ctx.driver
        if not isinstance(driver, WalArchiving):
            raise UsageError(f"job {job} (driver {ctx.job.driver}) does not archive WAL")
        if prefetching:
            return prefetch(args, driver, ctx)
        if driver.wal_fetch(args.name, dest, ctx.identities, str(ctx.identity_file)):
            if spool.is_segment(args.name):
                directory = spool.directory(str(ctx.state_dir), job)
                spool.start_prefetcher(directory, quick.config_path(args.config), job, args.name, after=True)
            return 0
    finally:
        ctx.close()
    print(f"backupd: {args.name}: not in the archive of job {job}", file=sys.stderr)
    return EXIT_FAILURE


def prefetch(args: argparse.Namespace, driver: WalArchiving, ctx: JobContext) -> int:
    """Run the prefetcher; with no lock handed over (``--lock-fd``), take it or leave if one runs."""
    import fcntl

    directory = Path(spool.directory(str(ctx.state_dir), ctx.name))
    directory.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(directory / spool.LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(log_fd, 2)  # detached: our log goes beside the spool
    os.close(log_fd)
    if args.lock_fd is None:
        lock = os.open(directory / spool.LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # one is already at work
    first = args.prefetch_from or args.prefetch_after
    driver.wal_prefetch(first, ctx.identities, str(ctx.identity_file), inclusive=args.prefetch_from is not None)
    return 0
