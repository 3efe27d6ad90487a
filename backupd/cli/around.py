"""What ``main()`` wraps around every command: TTY progress and the command's ``JobRun``.

Progress: backup, restore, verify and copy draw one progress line on stderr when it
is a terminal, nothing otherwise. Audit: the commands in ``audit.AUDITED``
record who ran them, on which job and backup, and the result, whether they
succeeded or failed, through their ``JobRun`` (``args.run``; handlers may set
its ``backup_id``). Exit statuses are ``backupd.jobrun``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from backupd import audit, progress
from backupd.jobrun import JobRun

PROGRESS_COMMANDS = frozenset({"backup", "restore", "verify", "copy"})


def run_handler(args: argparse.Namespace) -> int:
    command = args.command
    name = command if command != "keys" else f"keys {getattr(args, 'keys_command', '')}".strip()
    run = args.run = JobRun(name, getattr(args, "job", None))
    reporter = None
    if command in PROGRESS_COMMANDS and sys.stderr.isatty():
        reporter = progress.Reporter(f"{command} {getattr(args, 'job', '')}".strip(), sys.stderr)
        progress.install(reporter)
    try:
        code = args.handler(args)
    except BaseException as exc:
        if command in audit.AUDITED and _configured(args, run):
            run.failed(exc)
        raise
    finally:
        if reporter is not None:
            reporter.finish()
            progress.install(None)
    if command in audit.AUDITED and _configured(args, run):
        run.succeeded(result="success" if code == 0 else "failure", code=code)
    return code


def _configured(args: argparse.Namespace, run: JobRun) -> bool:
    """Give the run the settings the command loaded; False when there are none (nothing ran against a
    repository, and no state directory is known for the record)."""
    from backupd.cli.common import settings_from

    settings = getattr(args, "_settings", None)  # set by settings_from(); None when config failed
    if settings is None and args.command == "keys":
        with contextlib.suppress(Exception):  # key generation needs no config; record it when there is one
            settings = settings_from(args)
    run.settings = settings
    run.backup_id = run.backup_id or getattr(args, "backup", None)
    return settings is not None
