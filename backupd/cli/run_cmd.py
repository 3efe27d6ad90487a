"""backupd run: the daemon (scheduler, log archivers, metrics/health server, control socket)."""

from __future__ import annotations

import argparse

from backupd.cli.common import config_path, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("run", help="run the daemon in the foreground (systemd: Type=notify)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from backupd.daemon.service import run_daemon  # the scheduler stack loads only for the daemon

    settings = settings_from(args)
    if any(job.schedule or job.archive_logs for job in settings.jobs.values()):
        settings.encryption.require_recipients("the daemon's scheduled backups and log archiving")
    return run_daemon(settings, config_path(args))
