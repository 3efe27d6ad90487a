"""backupd prune JOB [--dry-run] [--json]: apply the job's retention policy (per repository, with several)."""

from __future__ import annotations

import argparse

from backupd.cli.common import print_json, print_table, with_job
from backupd.context import JobContext
from backupd.errors import BackupdError
from backupd.prune import PruneResult, run_prune
from backupd.retention import Decision
from backupd.timeutil import format_timestamp


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("prune", help="delete backups and logs the retention policy no longer keeps")
    parser.add_argument("job")
    parser.add_argument("--dry-run", action="store_true", help="print every decision with its reasons; delete nothing")
    parser.add_argument("--json", action="store_true", help="print the decisions and the outcome as JSON")
    parser.set_defaults(handler=run)


@with_job
def run(args: argparse.Namespace, ctx: JobContext) -> int:
    contexts = ctx.per_storage()
    if len(contexts) == 1:
        result = run_prune(ctx, dry_run=args.dry_run, run=getattr(args, "run", None))
        if args.json:
            print_json(result.to_dict())
        else:
            print_result(result)
        return 0
    # several repositories: each pruned by its own policy (retention_by_storage), one failing stops none
    results: dict[str, dict[str, object]] = {}
    failed: list[BackupdError] = []
    for one in contexts:
        name = one.only_storage or ""
        try:
            result = run_prune(one, dry_run=args.dry_run)
        except BackupdError as exc:
            failed.append(exc)
            results[name] = {"error": str(exc)}
            if not args.json:
                print(f"storage {name}: prune failed: {exc}")
            continue
        finally:
            one.close()
        results[name] = result.to_dict()
        if not args.json:
            print(f"storage {name}:")
            print_result(result)
    if args.json:
        print_json({"job": ctx.name, "storages": results})
    if failed:
        raise failed[0]
    return 0


def reasons(decision: Decision) -> str:
    return "; ".join(r.split(": ", 1)[1] if ": " in r else r for r in decision.reasons)


def log_ranges(logs: list[Decision]) -> list[list[str]]:
    """One row per run of consecutive logs with the same kind, directory, action and reasons
    (``FIRST .. LAST (N logs)``), not one per log object: an archive holds 100k of them."""
    rows: list[list[str]] = []
    run: list[Decision] = []

    def flush() -> None:
        if run:
            first, last = run[0], run[-1]
            name = first.name if len(run) == 1 else f"{first.name} .. {last.name} ({len(run)} logs)"
            rows.append([first.kind, name, format_timestamp(first.time) if first.time else "-", first.verdict,
                         reasons(first)])
            run.clear()

    for decision in logs:
        if run and (decision.kind, decision.name.rpartition("/")[0], decision.verdict, decision.reasons) != (
                run[0].kind, run[0].name.rpartition("/")[0], run[0].verdict, run[0].reasons):
            flush()
        run.append(decision)
    flush()
    return rows


def print_result(result: PruneResult) -> None:
    plan = result.plan
    if result.abandoned or result.leftovers:
        verb = "would remove" if result.dry_run else "removed"
        print(f"{verb} what dead runs left: {len(result.abandoned)} partial backup(s) "
              f"{' '.join(result.abandoned)}, {len(result.leftovers)} temporary object(s)".replace("  ", " "))
    if result.no_policy:
        print(f"job {result.job}: no retention policy; only what dead runs left is removed")
        return
    rows = [[d.kind, d.name, format_timestamp(d.time) if d.time else "-", d.verdict, reasons(d)]
            for d in [*plan.backups, *plan.partials]]
    rows += log_ranges(plan.logs)
    print_table(["KIND", "NAME", "TIME", "ACTION", "REASONS"], rows)
    for kind, first in sorted(plan.logs_kept_from.items()):
        print(f"{kind} from {first} on: kept, needed by the kept backups (not listed)")
    if plan.window_start is not None:
        print(f"PITR window starts {format_timestamp(plan.window_start)}")
    if plan.restorable_from is not None:
        print(f"restorable from {format_timestamp(plan.restorable_from)} after pruning")
    for warning in plan.warnings:
        print(f"warning: {warning}")
    for line in plan.untrusted:
        print(f"untrusted, kept and not planned from: {line}")
    for line in result.pitr_breaks:
        print(f"warning: {line}")
    backups, partials, logs = len(plan.deleted_backups()), len(plan.deleted_partials()), len(plan.deleted_logs())
    if result.dry_run:
        if plan.paused:
            print(f"dry run: pruning is paused: {plan.paused}")
        print(f"dry run: would delete {backups} backups, {partials} partial backups, {logs} logs; nothing touched")
        return
    print(f"deleted {len(result.deleted_backups)} backups, {len(result.deleted_partials)} partial backups, "
          f"{len(result.deleted_logs)} logs ({result.deleted_objects} objects)")
    for key in result.locked:
        print(f"locked (Object Lock retention), kept: {key}")
