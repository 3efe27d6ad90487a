"""backupd wal-fetch NAME DEST [--job JOB]: PostgreSQL's restore_command; exit 1 when NAME is not archived.

Replay asks for one file at a time, so the common case never gets here: the
fast path (``backupd.cli.quick``, which reads the command line) renames a file the
background prefetcher has spooled. This is where the call continues for everything else: it fetches from the
archive itself and makes sure a prefetcher is at work for the next requests.
``--prefetch-from NAME`` runs the prefetcher itself (started detached, never by hand).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from backupd import logs, spool
from backupd.errors import EXIT_FAILURE, UsageError

if TYPE_CHECKING:
    from backupd.cli.quick import Call
    from backupd.context import JobContext
    from backupd.driver import WalArchiving


def run(call: Call) -> int:
    prefetching = call.prefetch_from or call.prefetch_after
    name = call.args[0] if call.args else ""
    dest = Path()
    if not prefetching:
        if len(call.args) != 2:
            raise UsageError("wal-fetch: NAME and DEST are required (restore_command = 'backupd wal-fetch %f %p')")
        dest = Path(call.args[1]).absolute()
        if not dest.parent.is_dir():
            raise UsageError(f"wal-fetch: {dest.parent}: no such directory")
    logs.configure(call.log_format, call.log_level)
    from backupd.cli.common import settings_from
    from backupd.cli.wal_push_cmd import wal_job
    from backupd.context import JobContext
    from backupd.driver import WalArchiving

    settings = settings_from(call)
    job = wal_job(settings, call.job, "wal-fetch")
    ctx = JobContext(settings, job)
    try:
        driver = ctx.driver
        if not isinstance(driver, WalArchiving):
            raise UsageError(f"job {job} (driver {ctx.job.driver}) does not archive WAL")
        if prefetching:
            return prefetch(call, driver, ctx)
        if driver.wal_fetch(name, dest, ctx.identities, str(ctx.identity_file)):
            return 0  # the driver starts its prefetcher after what it fetched
    finally:
        ctx.close()
    print(f"backupd: {name}: not in the archive of job {job}", file=sys.stderr)
    return EXIT_FAILURE


def prefetch(call: Call, driver: WalArchiving, ctx: JobContext) -> int:
    """Run the prefetcher; with no lock handed over (``--lock-fd``), take it or leave if one runs."""
    import fcntl

    directory = Path(spool.directory(str(ctx.state_dir), ctx.name))
    directory.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(directory / spool.LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(log_fd, 2)  # detached: our log goes beside the spool
    os.close(log_fd)
    if call.lock_fd is None:
        lock = os.open(directory / spool.LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # one is already at work
    first = call.prefetch_from or call.prefetch_after or ""
    driver.wal_prefetch(first, ctx.identities, str(ctx.identity_file), inclusive=call.prefetch_from is not None)
    return 0
