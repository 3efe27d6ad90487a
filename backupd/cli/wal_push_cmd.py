"""backupd wal-push PATH [--job JOB]: PostgreSQL's archive_command; exit 0 only once the file is durable.

PostgreSQL runs this once per WAL segment, so the common case never gets
here: ``backupd.cli.quick`` reads the command line and hands the file to the
running daemon. This is where that call continues when the fast path could not
finish it: it loads the configuration, reports a daemon's refusal properly (from
the answer the fast path already got, or by asking now if it could not), else
uploads the file itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from backupd import control, logs, plugins
from backupd.descriptor import WAL_ARCHIVING
from backupd.errors import BackupdError, UsageError

if TYPE_CHECKING:
    from backupd.cli.quick import Call
    from backupd.settings import Settings


def wal_job(settings: Settings, job: str | None, command: str) -> str:
    """The named job, or the one job whose driver archives WAL with archive_logs on."""
    if job is not None:
        settings.job(job)
        return job
    candidates = [name for name, cfg in sorted(settings.jobs.items()) if cfg.archive_logs
                  and WAL_ARCHIVING in plugins.driver_descriptor(cfg.driver).capabilities]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UsageError(f"{command}: no job archives WAL (archive_logs = true with a postgres driver); pass --job")
    raise UsageError(f"{command}: several jobs archive WAL ({', '.join(candidates)}); pass --job JOB")


def hand_to_daemon(state_dir: Path, call: Call, path: Path) -> bool:
    """True once a running daemon reports the file durable; False when no daemon answers.

    A daemon the fast path already asked at this socket is not asked again: its answer stands.
    """
    socket = control.socket_path(state_dir)
    if os.path.abspath(socket) in call.answers:
        answer = call.answers[os.path.abspath(socket)]
        reply = json.loads(answer) if answer else None  # b"": it took the request and gave no answer
    else:
        message = {"op": "wal-push", "path": str(path)}
        if call.job:
            message["job"] = call.job
        try:
            reply = control.request(socket, message, timeout=600)
        except (OSError, ValueError):
            return False  # the daemon hung up or timed out: push ourselves (pushes are idempotent)
    if reply is None:
        return False
    if reply.get("ok"):
        return True
    raise BackupdError(f"wal-push {path.name}: {reply.get('error', 'the daemon refused the push')}")


def run(call: Call) -> int:
    path = Path(call.args[0]).absolute()
    if not path.is_file():
        raise UsageError(f"wal-push: {path}: no such file")
    logs.configure(call.log_format, call.log_level)
    from backupd.cli.common import settings_from
    from backupd.context import JobContext
    from backupd.driver import WalArchiving

    settings = settings_from(call)
    if not call.no_daemon and hand_to_daemon(settings.daemon.state_dir, call, path):
        return 0
    job = wal_job(settings, call.job, "wal-push")
    ctx = JobContext(settings, job)
    try:
        if not isinstance(ctx.driver, WalArchiving):
            raise UsageError(f"job {job} (driver {ctx.job.driver}) does not archive WAL")
        ctx.driver.wal_push(path)
    finally:
        ctx.close()
    return 0
