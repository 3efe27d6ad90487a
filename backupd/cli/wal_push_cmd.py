"""backupd wal-push PATH [--job JOB]: PostgreSQL's archive_command; exit 0 only once the file is durable.

PostgreSQL runs this once per WAL segment, so the common case never gets
here: the fast path (``backupd.cli.quick``) hands the file to the running
daemon. This is the full command: it loads the configuration, asks the daemon
once more (and reports its refusal properly), else uploads the file itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from backupd import control
from backupd import logs
from backupd.cli import quick
from backupd.errors import BackupdError, UsageError

if TYPE_CHECKING:
    from backupd.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("wal-push", help="archive one WAL file (PostgreSQL archive_command: wal-push %%p)")
    parser.add_argument("path", help="the file PostgreSQL names with %%p (relative to its data directory)")
    parser.add_argument("--job", help="the postgres job; may be left out when only one archives WAL")
    parser.add_argument("--no-daemon", action="store_true", help="upload directly, without asking a running daemon")
    parser.set_defaults(handler=run, defer_logging=True)


def wal_job(settings: Settings, job: str | None, command: str) -> str:
    """The named job, or the one job whose driver archives WAL with archive_logs on."""
    from backupd.context import JobContext
    from backupd.driver import WalArchiving

    if job is not None:
        settings.job(job)
        return job
    candidates = [name for name, cfg in sorted(settings.jobs.items()) if cfg.archive_logs
                  and isinstance(JobContext(settings, name).driver, WalArchiving)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UsageError(f"{command}: no job archives WAL (archive_logs = true with a postgres driver); pass --job")
    raise UsageError(f"{command}: several jobs archive WAL ({', '.join(candidates)}); pass --job JOB")


def hand_to_daemon(state_dir: Path, job: str | None, path: Path) -> bool:
    """True once a running daemon reports the file durable; False when no daemon answers."""
    message = {"op": "wal-push", "path": str(path)}
    if job:
        message["job"] = job
    try:
        reply = control.request(control.socket_path(state_dir), message, timeout=600)
    except (OSError, ValueError):
        return False  # the daemon hung up or timed out: push ourselves (pushes are idempotent)
    if reply is None:
        return False
    if reply.get("ok"):
        return True
    raise BackupdError(f"wal-push {path.name}: {reply.get('error', 'the daemon refused the push')}")


def run(args: argparse.Namespace) -> int:
    path = Path(args.path).absolute()
    if not path.is_file():
        raise UsageError(f"wal-push: {path}: no such file")
    logs.configure(args.log_format, args.log_level)
    from backupd.cli.common import settings_from
    from backupd.context import JobContext
    from backupd.driver import WalArchiving

    settings = settings_from(args)
    asked = not args.no_daemon and not quick.daemon_failed  # the fast path may have waited for it in vain
    if asked and hand_to_daemon(settings.daemon.state_dir, args.job, path):
        return 0
    job = wal_job(settings, args.job, "wal-push")
    ctx = JobContext(settings, job)
    try:
        if not isinstance(ctx.driver, WalArchiving):
            raise UsageError(f"job {job} (driver {ctx.job.driver}) does not archive WAL")
        ctx.driver.wal_push(path)
    finally:
        ctx.close()
    return 0
