"""backupd restore JOB --to TARGET [...]: restore a backup (to a point in time where logs allow)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backupd.cli.common import with_job
from backupd.context import JobContext
from backupd.driver import RestoreRequest, RestoreTarget
from backupd.errors import UsageError
from backupd.restore import run_restore
from backupd.timeutil import parse_timestamp

TARGET_KINDS = ("time", "lsn", "xid", "name", "position", "gtid")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("restore", help="restore a backup")
    parser.add_argument("job")
    parser.add_argument("--to", required=True, metavar="TARGET",
                        help="a file (sqlite), a directory (postgres physical, redis) or a URL without password")
    parser.add_argument("--backup", metavar="ID", help="restore this backup (default: chosen from the target)")
    targets = parser.add_mutually_exclusive_group()
    for kind in TARGET_KINDS:
        targets.add_argument(f"--target-{kind}", dest=f"target_{kind}", metavar=kind.upper())
    parser.add_argument("--target-action", choices=("promote", "pause", "shutdown"))
    parser.add_argument("--table", "--collection", dest="tables", action="append", default=[], metavar="NAME",
                        help="restore only this table (repeatable)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing target")
    parser.add_argument("--clean", action="store_true", help="drop existing objects in the target database first")
    parser.add_argument("--jobs", type=int, default=1, help="parallel restore workers where the tool supports it")
    parser.add_argument("--password-file", type=Path, help="password for the --to URL")
    parser.add_argument("--target-timeline", metavar="TLI",
                        help="PostgreSQL: recover along this timeline (a number, or 'latest' to follow any); "
                             "default: the newest timeline of the job's own cluster")
    parser.add_argument("--archive-mode", choices=("off", "preserve"), default="off",
                        help="PostgreSQL: 'off' (default) writes archive_mode = off into the restored cluster so a copy "
                             "never archives into the job's WAL; 'preserve' keeps the backup's (restoring the primary "
                             "itself in place)")
    parser.add_argument("--to-gap", action="store_true",
                        help="where the archived logs have a gap, restore up to it (the latest reachable point)")
    parser.add_argument("--delta", action="store_true",
                        help="PostgreSQL physical: restore over an existing stopped data directory, fetching only "
                             "the files (chunks) whose checksum differs and removing files the backup lacks")
    parser.add_argument("--tablespace-map", action="append", default=[], metavar="NAME=DIR",
                        help="PostgreSQL physical: restore tablespace NAME (or its oid) to DIR (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and touch nothing")
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="with trusted_keys set, also read unsigned backups (from before signing); "
                             "a badly signed one is still refused")
    parser.set_defaults(handler=run)


def target_from(args: argparse.Namespace) -> RestoreTarget | None:
    for kind in TARGET_KINDS:
        value = getattr(args, f"target_{kind}")
        if value is None:
            continue
        if kind == "time":
            try:
                return RestoreTarget(kind, value, parse_timestamp(value))
            except ValueError as exc:
                raise UsageError(f"--target-time: {exc}") from None
        return RestoreTarget(kind, value)
    return None


def timeline_from(text: str | None) -> str | None:
    if text is None or text == "latest":
        return text
    value = text.lower().removeprefix("0x")
    base = 16 if text.lower().startswith("0x") else 10
    try:
        number = int(value, base)
    except ValueError:
        raise UsageError(f"--target-timeline: a timeline number or 'latest' (got {text!r})") from None
    if number < 1:
        raise UsageError(f"--target-timeline: timelines start at 1 (got {text!r})")
    return str(number)


@with_job
def run(args: argparse.Namespace, ctx: JobContext) -> int:
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1 (got {args.jobs})")
    spaces: dict[str, str] = {}
    for item in args.tablespace_map:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory.startswith("/"):
            raise UsageError(f"--tablespace-map: expected NAME=/absolute/dir (got {item!r})")
        if name in spaces:
            raise UsageError(f"--tablespace-map: {name} given twice")
        spaces[name] = directory
    request = RestoreRequest(
        to=args.to,
        target=target_from(args),
        to_gap=args.to_gap,
        target_timeline=timeline_from(args.target_timeline),
        archive_mode=args.archive_mode,
        tables=args.tables,
        dry_run=args.dry_run,
        force=args.force,
        clean=args.clean,
        jobs=args.jobs,
        target_action=args.target_action,
        password_file=args.password_file,
        delta=args.delta,
        tablespace_map=spaces,
    )
    if args.allow_unsigned and ctx.settings.trusted_keys(ctx.name):
        print(f"WARNING: --allow-unsigned: job {ctx.name}: unsigned backups are accepted; nothing proves "
              "who wrote them", file=sys.stderr)
    run_restore(ctx, request, args.backup, emit=print)
    return 0
