"""backupd copy JOB --to STORAGE [--from STORAGE]: copy what one repository of the job lacks from another."""

from __future__ import annotations

import argparse

from backupd.catchup import for_target
from backupd.cli.common import print_json, with_job
from backupd.context import JobContext
from backupd.errors import EXIT_FAILURE, UsageError
from backupd.progress import human


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("copy", help="copy the backups and logs one repository of the job lacks from another")
    parser.add_argument("job")
    parser.add_argument("--to", required=True, metavar="STORAGE", help="the repository to fill")
    parser.add_argument("--from", dest="source", metavar="STORAGE",
                        help="the repository to copy from (default: the job's others, in order)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be copied; copy nothing")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run)


@with_job
def run(args: argparse.Namespace, ctx: JobContext) -> int:
    storages = ctx.job.storages
    names = [args.source] if args.source else [name for name in storages if name != args.to]
    for name in (args.to, *names):
        ctx.for_storage(name)  # not one of the job's: ConfigError naming them
    if args.to in names:
        raise UsageError("copy: --to and --from name the same storage")
    if not names:
        raise UsageError(f"copy: job {ctx.name} has one storage; there is nothing to copy from")
    target = ctx.for_storage(args.to)
    sources = [ctx.for_storage(name) for name in names]
    try:
        copier = for_target(target, {s.only_storage or "": s.storage for s in sources})
        plan = copier.plan()
        if args.dry_run:
            keys = [key for unit in plan for key in unit.keys]
            if args.json:
                print_json({"to": args.to, "from": names, "would_copy": keys})
            else:
                for key in keys:
                    print(key)
                print(f"dry run: would copy {len(keys)} object(s) to {args.to}; nothing touched")
            return 0
        result = copier.run(plan)
    finally:
        for other in (target, *sources):
            other.close()
    if args.json:
        print_json({"to": args.to, "from": names, "copied": result.copied, "bytes": result.bytes,
                    "failed": result.failed})
    elif result.copied:
        print(f"copied {len(result.copied)} object(s), {human(result.bytes)}, to {args.to} from {', '.join(names)}")
    elif not result.failed:
        print(f"nothing to copy: {args.to} holds everything {', '.join(names)} holds")
    for line in result.failed:
        print(f"not copied (no good copy in {', '.join(names)}): {line}")
    return EXIT_FAILURE if result.failed else 0
