"""backupd pin ID / backupd unpin ID [--job JOB]: exempt a backup from retention, or stop doing so."""

from __future__ import annotations

import argparse

from backupd.cli.common import settings_from
from backupd.context import JobContext
from backupd.errors import BackupNotFound, UsageError
from backupd.pins import Pins
from backupd.timeutil import BACKUP_ID_RE


def register(sub: argparse._SubParsersAction) -> None:
    pin = sub.add_parser("pin", help="keep a backup whatever the retention policy says")
    pin.add_argument("backup_id")
    pin.add_argument("--job", help="the backup's job (default: search every job)")
    pin.add_argument("--note", default="", help="why it is pinned (stored with the pin)")
    pin.set_defaults(handler=run_pin)
    unpin = sub.add_parser("unpin", help="let retention decide about a pinned backup again")
    unpin.add_argument("backup_id")
    unpin.add_argument("--job", help="the backup's job (default: search every job)")
    unpin.set_defaults(handler=run_unpin)


def _contexts(args: argparse.Namespace) -> list[JobContext]:
    if not BACKUP_ID_RE.match(args.backup_id):
        raise UsageError(f"not a backup id (like 20261124T020000Z): {args.backup_id!r}")
    settings = settings_from(args)
    jobs = [args.job] if args.job else sorted(settings.jobs)
    for job in jobs:
        settings.job(job)
    return [JobContext(settings, job) for job in jobs]


def run_pin(args: argparse.Namespace) -> int:
    contexts = _contexts(args)
    try:
        for ctx in contexts:
            if args.backup_id in ctx.repository.backup_ids():
                Pins(ctx.storage, ctx.name).pin(args.backup_id, args.note)
                print(f"pinned {args.backup_id} of job {ctx.name}")
                return 0
    finally:
        for ctx in contexts:
            ctx.close()
    raise BackupNotFound(f"backup {args.backup_id} not found in the repositories of: "
                         f"{', '.join(c.name for c in contexts) or 'no jobs'}")


def run_unpin(args: argparse.Namespace) -> int:
    contexts = _contexts(args)
    try:
        for ctx in contexts:
            if Pins(ctx.storage, ctx.name).unpin(args.backup_id):
                print(f"unpinned {args.backup_id} of job {ctx.name}")
                return 0
    finally:
        for ctx in contexts:
            ctx.close()
    raise BackupNotFound(f"backup {args.backup_id} is not pinned in: {', '.join(c.name for c in contexts) or 'no jobs'}")
