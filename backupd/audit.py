"""The audit trail: who ran what, on which job and backup, with what result.

Each event is one JSON line appended to ``state_dir/audit.log`` and one small
object under ``<job>/audit/`` in the repository, so the trail survives the loss
of the host. The repository's copy has its ``detail`` (an error message, which
may quote restored content) sealed to the job's recipients (``backupd.sealed``).
Recording never changes the outcome of the command it describes: a failure to
write it is logged as a warning.
"""

from __future__ import annotations

import io
import json
import os
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import structlog

from backupd import sealed
from backupd.redact import redact
from backupd.repository import Layout
from backupd.storage import Storage
from backupd.timeutil import format_timestamp, utcnow
from backupd.whoami import current_user

if TYPE_CHECKING:
    from backupd.context import JobContext

log = structlog.get_logger(__name__)

LOG_NAME = "audit.log"
#: CLI commands that are audited (``keys`` covers key generation; restore and verify use the private key).
AUDITED = frozenset({"backup", "restore", "verify", "prune", "keys", "pin", "unpin"})


def make_event(command: str, *, job: str | None, backup_id: str | None, result: str,
               detail: str | None = None, trigger: str = "cli", **extra: Any) -> dict[str, Any]:
    event = {
        "time": format_timestamp(utcnow()),
        "user": current_user(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "trigger": trigger,
        "command": command,
        "job": job,
        "backup_id": backup_id,
        "result": result,
    }
    if detail:
        event["detail"] = redact(detail)
    event.update({k: v for k, v in extra.items() if v is not None})
    return event


def append(state_dir: Path, event: dict[str, Any]) -> None:
    """One ``write`` on an O_APPEND file: concurrent writers never interleave lines."""
    line = (json.dumps(event, sort_keys=True) + "\n").encode()
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def object_key(job: str, event: dict[str, Any]) -> str:
    return Layout(job).audit_key(event["time"], event.get("host"), event.get("pid", 0), uuid.uuid4().hex[:8])


#: Members of an event that may carry text from outside backupd's control.
SEALED_FIELDS = ("detail",)


def ship(storage: Storage, job: str, event: dict[str, Any], recipients: Sequence[object]) -> str:
    """Put the event in the repository, its ``detail`` sealed (dropped when there is no recipient to seal to)."""
    key = object_key(job, event)
    stored = sealed.seal_fields(event, SEALED_FIELDS, recipients) if recipients else \
        {name: value for name, value in event.items() if name not in SEALED_FIELDS}
    storage.put(key, io.BytesIO(json.dumps(stored, sort_keys=True).encode() + b"\n"))
    return key


def record_for_job(ctx: "JobContext", event: dict[str, Any]) -> None:
    """``record`` into the job's state dir and repository; storage that cannot be opened only skips the shipping."""
    storage = None
    recipients: Sequence[object] = ()
    try:
        storage = ctx.storage
        recipients = ctx.recipients
    except Exception:
        pass
    record(ctx.state_dir, event, storage, recipients)


def record(state_dir: Path | None, event: dict[str, Any], storage: Storage | None = None,
           recipients: Sequence[object] = ()) -> None:
    """Append locally and ship to the job's repository; warn (never raise) on failure."""
    if state_dir is not None:
        try:
            append(state_dir, event)
        except OSError as exc:
            log.warning("audit event not written", path=str(state_dir / LOG_NAME), error=exc.strerror or str(exc))
    job = event.get("job")
    if storage is not None and job:
        try:
            ship(storage, job, event, recipients)
        except Exception as exc:  # storage down is the likely reason the command failed anyway
            log.warning("audit event not shipped to the repository", job=job, error=str(exc))
