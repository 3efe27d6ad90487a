"""Backups that ``backupd backup`` asks the running daemon for, over the control socket.

The daemon has its imports, configuration and plugins loaded already, so the
dump starts at once instead of after a Python start-up, and the run is counted
in the daemon's metrics. The daemon takes the request only when it runs the
very configuration the command would (``backupd.configprint``); otherwise, and
whenever it is stopping or does not know the job, it answers ``fallback`` and
the command takes the backup itself. If the command goes away (Ctrl-C, killed),
the backup is aborted and its objects removed, as a local run's would be.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Callable

import structlog

from backupd import audit
from backupd.backup import run_backup
from backupd.context import JobContext
from backupd.control import Peer, with_peer
from backupd.daemon.runs import Runs
from backupd.errors import EXIT_FAILURE, Aborted, BackupdError, ConfigError
from backupd.redact import redact
from backupd.whoami import user_name

if TYPE_CHECKING:
    from backupd.settings import Settings

log = structlog.get_logger(__name__)

OP = "backup"


def handler(settings: Callable[[], "Settings"], fingerprint: Callable[[], str | None], runs: Runs):
    @with_peer
    def backup(message: dict[str, Any], peer: Peer) -> dict[str, Any]:
        printed = fingerprint()
        current = settings()
        job = message.get("job")
        if printed is None or message.get("fingerprint") != printed or fingerprint() != printed:  # no reload between
            return {"ok": False, "fallback": "the daemon runs another version of the configuration"}
        if not isinstance(job, str) or job not in current.jobs:
            return {"ok": False, "fallback": "the daemon does not know the job"}
        if runs.stopping:
            return {"ok": False, "fallback": "the daemon is stopping"}
        client_pid, client_uid, _ = peer.credentials()
        method = message.get("method")
        with runs.start(f"backup:{job}:cli-{client_pid}", job, None) as run:
            done = threading.Event()
            peer.watch_hangup(lambda: run.abort("the backupd backup command went away"), done)
            ctx = JobContext(current, job)
            try:
                try:
                    with structlog.contextvars.bound_contextvars(trigger="cli", client_pid=client_pid):
                        manifest = run_backup(ctx, method if isinstance(method, str) else None,
                                              wait=float(message.get("wait") or 0), cancel=run.cancel)
                except BaseException as exc:
                    aborted = isinstance(exc, Aborted) and run.reason
                    reply = _failure(exc, f"{run.job_id} aborted ({run.reason})" if aborted else None)
                    _audit(ctx, message, client_pid, client_uid, None, "failure", reply["error"], reply["exit_code"])
                    if not isinstance(exc, Exception):
                        raise
                    return reply
                _audit(ctx, message, client_pid, client_uid, manifest.backup_id, "success", None, 0)
            finally:
                done.set()
                ctx.close()
        return {"ok": True, "backup_id": manifest.backup_id, "job": job, "method": manifest.method,
                "raw": manifest.raw_size, "stored": manifest.stored_size,
                "seconds": round(manifest.duration_seconds, 3), "daemon_pid": os.getpid()}

    return backup


def _failure(exc: BaseException, detail: str | None) -> dict[str, Any]:
    if isinstance(exc, BackupdError):
        reply = {"ok": False, "error": detail or redact(str(exc)), "exit_code": exc.exit_code}
        if exc.hint:
            reply["hint"] = exc.hint
        if isinstance(exc, ConfigError):
            reply["errors"] = [redact(line) for line in exc.errors]
        return reply
    log.exception("requested backup failed with an internal error")
    return {"ok": False, "error": f"internal error: {type(exc).__name__}: {redact(str(exc))}",
            "exit_code": EXIT_FAILURE}


def _audit(ctx: JobContext, message: dict[str, Any], client_pid: int, client_uid: int, backup_id: str | None,
           result: str, detail: str | None, code: int) -> None:
    """The command's audit event, as it would record it itself: its user and pid, trigger "cli"."""
    claimed = message.get("user")
    uid_name = user_name(client_uid)
    user = claimed if isinstance(claimed, str) and uid_name in claimed else uid_name  # the kernel's word wins
    audit.record_for_job(ctx, audit.make_event("backup", job=ctx.name, backup_id=backup_id, result=result,
                                               detail=detail, exit_code=code, user=user, pid=client_pid,
                                               via=f"daemon pid {os.getpid()}"))
