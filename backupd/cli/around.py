"""What ``main()`` wraps around every command: TTY progress and the audit trail.

Progress: backup, restore, verify and copy draw one progress line on stderr when it
is a terminal, nothing otherwise. Audit: the commands in ``audit.AUDITED``
record who ran them, on which job and backup, and the result, whether they
succeeded or failed; handlers may set ``args.audit_backup_id``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from backupd import audit, progress
from backupd.errors import EXIT_INTERRUPTED, BackupdError

PROGRESS_COMMANDS = frozenset({"backup", "restore", "verify", "copy"})


def run_handler(args: argparse.Namespace) -> int:
    command = args.command
    reporter = None
    if command in PROGRESS_COMMANDS and sys.stderr.isatty():
        reporter = progress.Reporter(f"{command} {getattr(args, 'job', '')}".strip(), sys.stderr)
        progress.install(reporter)
    try:
        code = args.handler(args)
    except BaseException as exc:
        if command in audit.AUDITED and isinstance(exc, KeyboardInterrupt):
            _record(args, "interrupted", "interrupted by SIGINT", EXIT_INTERRUPTED)
        elif command in audit.AUDITED:
            _record(args, "failure", str(exc) if isinstance(exc, BackupdError) else f"{type(exc).__name__}: {exc}",
                    getattr(exc, "exit_code", 1))
        raise
    finally:
        if reporter is not None:
            reporter.finish()
            progress.install(None)
    if command in audit.AUDITED:
        _record(args, "success" if code == 0 else "failure", None, code)
    return code


def _record(args: argparse.Namespace, result: str, detail: str | None, code: int) -> None:
    from backupd.cli.common import settings_from
    from backupd.context import JobContext

    settings = getattr(args, "_settings", None)  # set by settings_from(); None when config failed
    if settings is None and args.command == "keys":
        with contextlib.suppress(Exception):  # key generation needs no config; record it when there is one
            settings = settings_from(args)
    job = getattr(args, "job", None)
    if settings is None and args.command != "keys":
        return  # no state_dir known: nothing ran against a repository either
    name = args.command if args.command != "keys" else f"keys {getattr(args, 'keys_command', '')}".strip()
    backup_id = getattr(args, "audit_backup_id", None) or getattr(args, "backup", None)
    event = audit.make_event(name, job=job, backup_id=backup_id, result=result, detail=detail, exit_code=code)
    if settings is None or job is None or job not in settings.jobs:
        audit.record(settings.daemon.state_dir if settings is not None else None, event)
        return
    ctx = JobContext(settings, job)
    try:
        audit.record_for_job(ctx, event)
    finally:
        ctx.close()
