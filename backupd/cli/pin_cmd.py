"""backupd pin ID / backupd unpin ID [--job JOB]: exempt a backup from retention, or stop doing so."""

from __future__ import annotations

import argparse

from backupd.cli.common import job_of_backup, settings_from
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


def run_pin(args: argparse.Namespace) -> int:
    ctx = job_of_backup(args)
    try:
        Pins(ctx.storage, ctx.name).pin(args.backup_id, args.note)
        print(f"pinned {args.backup_id} of job {ctx.name}")
        return 0
    finally:
        ctx.close()


def run_unpin(args: argparse.Namespace) -> int:
    if not BACKUP_ID_RE.match(args.backup_id):
        raise UsageError(f"not a backup id (like 20261124T020000Z): {args.backup_id!r}")
    settings = settings_from(args)
    jobs = [args.job] if args.job else sorted(settings.jobs)
    for job in jobs:
        settings.job(job)
    contexts = [JobContext(settings, job) for job in jobs]
    try:
        pinned = [ctx for ctx in contexts if Pins(ctx.storage, ctx.name).is_pinned(args.backup_id)]
        if len(pinned) > 1:
            names = ", ".join(ctx.name for ctx in pinned)
            raise UsageError(f"backup id {args.backup_id} is ambiguous: jobs {names} each have it pinned",
                             hint=f"name the job with --job (one of: {names})")
        if pinned:
            Pins(pinned[0].storage, pinned[0].name).unpin(args.backup_id)
            print(f"unpinned {args.backup_id} of job {pinned[0].name}")
            return 0
    finally:
        for ctx in contexts:
            ctx.close()
    raise BackupNotFound(f"backup {args.backup_id} is not pinned in: {', '.join(c.name for c in contexts) or 'no jobs'}")
