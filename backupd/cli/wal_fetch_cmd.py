"""backupd wal-fetch NAME DEST [--job JOB]: PostgreSQL's restore_command; exit 1 when NAME is not archived.

Replay asks for segments one process at a time, so two things keep it fed: a
segment already prefetched into the spool is delivered after reading only
``daemon.state_dir`` from the configuration, and every call makes sure a
background ``wal-fetch --prefetch-after NAME`` is filling the spool with the
segments replay will ask for next.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import subprocess
import sys
from pathlib import Path

from backupd import logs
from backupd.cli import quick
from backupd.errors import EXIT_FAILURE, UsageError
from backupd.paths import DEFAULT_CONFIG, PREFETCH_LOCK, wal_fetch_spool

SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
LOW_WATER = 8  # prefetched segments left ahead of replay before the next prefetch starts


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("wal-fetch", help="fetch one WAL file (PostgreSQL restore_command: wal-fetch %%f %%p)")
    parser.add_argument("name", nargs="?", help="the WAL file name (%%f)")
    parser.add_argument("dest", nargs="?", help="where to write it (%%p)")
    parser.add_argument("--job", help="the postgres job; may be left out when only one archives WAL")
    parser.add_argument("--prefetch-after", metavar="NAME", help=argparse.SUPPRESS)  # the background half
    parser.set_defaults(handler=run, defer_logging=True)


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("BACKUPD_CONFIG") or DEFAULT_CONFIG).absolute()


def spawn_prefetch(args: argparse.Namespace, job: str, spool: Path, after: str, *, only_when_low: bool) -> None:
    """Start the background prefetcher unless one runs or enough segments wait in the spool.

    The prefetch lock is taken here, before the child starts, and handed to it
    (an inherited descriptor holds a flock): the calls that follow at once see
    a prefetcher at work and wait for its files instead of fetching them too.
    """
    if not SEGMENT_RE.match(after) or not spool.is_dir():
        return
    if only_when_low:
        ahead = sum(1 for entry in os.scandir(spool)
                    if SEGMENT_RE.match(entry.name) and entry.name[:8] == after[:8] and entry.name > after)
        if ahead >= LOW_WATER:
            return
    try:
        lock = os.open(spool / PREFETCH_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a prefetcher is already at work
        argv = [sys.executable, "-m", "backupd", "--config", str(_config_path(args)), "--log-format", "json",
                "wal-fetch", "--job", job, "--prefetch-after", after]
        with open(spool / "prefetch.log", "ab") as log_file:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
                             start_new_session=True, pass_fds=(lock,))
    finally:
        os.close(lock)  # the child's copy keeps the lock until it exits


def deliver_prefetched(args: argparse.Namespace, dest: Path) -> bool:
    """Move an already prefetched segment into place; False when there is none."""
    if not SEGMENT_RE.match(args.name):
        return False
    raw = quick.raw_config(args)
    job = quick.wal_job(raw, args.job)
    if not raw or not job:
        return False
    spool = wal_fetch_spool(quick.state_dir(raw), job)
    try:
        os.replace(spool / args.name, dest)  # same file system: atomic; else the full path copies
    except OSError:
        return False
    spawn_prefetch(args, job, spool, args.name, only_when_low=True)
    return True


def run(args: argparse.Namespace) -> int:
    if args.prefetch_after is None:
        if args.name is None or args.dest is None:
            raise UsageError("wal-fetch: NAME and DEST are required (restore_command = 'backupd wal-fetch %f %p')")
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
        if args.prefetch_after is not None:
            ctx.driver.wal_prefetch(args.prefetch_after, ctx.identities, str(ctx.identity_file))
            return 0
        if fetch(args.name, dest, ctx.identities, str(ctx.identity_file)):
            spawn_prefetch(args, job, wal_fetch_spool(ctx.state_dir, job), args.name, only_when_low=False)
            return 0
    finally:
        ctx.close()
    print(f"backupd: {args.name}: not in the archive of job {job}", file=sys.stderr)
    return EXIT_FAILURE
