"""backupd migrate JOB [--dry-run] [--json]: move the job's repository from an older layout to the current one."""

from __future__ import annotations

import argparse

from backupd.cli.common import print_json, with_job
from backupd.context import JobContext
from backupd.migrate import MigrationResult, kinds_of, migrate


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("migrate", help="move a repository written in an older layout to the current one")
    parser.add_argument("job")
    parser.add_argument("--dry-run", action="store_true", help="print what would move; touch nothing")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    parser.set_defaults(handler=run)


@with_job
def run(args: argparse.Namespace, ctx: JobContext) -> int:
    result = MigrationResult(ctx.name, args.dry_run)
    for storage in ctx.job.storages:  # each of the job's repositories on its own (DESIGN.md "Copies")
        one = migrate(ctx.for_storage(storage).storage, ctx.name, kinds_of(ctx.job.driver), dry_run=args.dry_run)
        result.moved += one.moved
        result.problems += [f"{storage}: {problem}" if len(ctx.job.storages) > 1 else problem
                            for problem in one.problems]
        result.done = sorted(set(result.done) | set(one.done)) if storage == ctx.job.storages[0] else \
            sorted(set(result.done) & set(one.done))
    if args.json:
        print_json(result.to_dict())
    elif args.dry_run:
        print(f"dry run: would move {len(result.moved)} log objects of job {ctx.name} to the current layout; "
              "nothing touched")
    else:
        print(f"moved {len(result.moved)} log objects of job {ctx.name} to the current layout"
              + (f"; {len(result.problems)} left in the old one" if result.problems else ""))
        for problem in result.problems:
            print(f"not moved: {problem}")
    return 1 if result.problems else 0
