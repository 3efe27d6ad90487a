"""backupd verify JOB [--backup ID] [--integrity-only | --pitr-drill]: prove backups are good."""

from __future__ import annotations

import argparse

from backupd.cli.common import print_json, printable, with_job
from backupd.context import JobContext
from backupd.errors import EXIT_VERIFY_BAD
from backupd.verify import run_verification


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("verify", help="verify backups (full restore, or sha256 only)")
    parser.add_argument("job")
    parser.add_argument("--backup", metavar="ID", help="this backup (default: the newest; with --integrity-only: all)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--integrity-only", action="store_true",
                      help="check every object's size and sha256 against its manifest; needs no private key")
    mode.add_argument("--pitr-drill", action="store_true",
                      help="after the full verification, also restore to a random moment of the PITR window "
                           "and make sure it starts and answers queries")
    parser.add_argument("--json", action="store_true", help="print the report(s) as JSON")
    parser.set_defaults(handler=run)


@with_job
def run(args: argparse.Namespace, ctx: JobContext) -> int:
    reports = run_verification(ctx, args.backup, integrity_only=args.integrity_only,
                               pitr_drill=args.pitr_drill, run=getattr(args, "run", None))
    # what dead runs left is the whole repository's concern: listed when checking it all, not one backup
    whole = args.integrity_only and not args.backup
    partial, leftovers = ctx.repository.abandoned(remove=False) if whole else ([], [])
    if args.json:
        print_json({"reports": [r.to_dict() for r in reports],
                    "abandoned": {"partial_backups": partial, "temporary": leftovers}})
    else:
        for report in reports:
            verdict = "ok" if report.ok else "BAD"
            extra = f", restored in {report.restore_seconds:.2f} s" if report.restore_seconds is not None else ""
            print(f"{report.backup_id}  {report.mode}  {verdict}{extra}")
            for step in report.steps:
                if step.get("step") == "pitr drill":
                    print(f"  pitr drill to {step.get('target_time') or '-'}: {step.get('result')}"
                          f" ({step.get('seconds', 0):.2f} s)")
            for problem in report.problems:  # may quote restored content: escaped for the terminal
                print(f"  {printable(problem)}")
            for note in report.notes:
                print(f"  note: {printable(note)}")
        if partial or leftovers:
            print(f"note: dead runs left {len(partial)} partial backup(s) and {len(leftovers)} temporary object(s); "
                  "the next backup or prune removes them")
    return 0 if all(r.ok for r in reports) else EXIT_VERIFY_BAD
