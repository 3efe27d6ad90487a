"""What the daemon keeps in ``state_dir``: its lock, and when each scheduled job last ran.

``daemon.lock`` (flock) makes one daemon per state_dir. ``schedule.json`` keeps
the last run time of each scheduler job and the last integrity read of each
backup, so a restarted daemon knows which runs it missed while it was down.
It is written atomically (temp file, fsync, rename); a corrupt or missing file
only means "no history".
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any

import structlog

from backupd.errors import EXIT_USAGE, BackupdError
from backupd.timeutil import format_timestamp, parse_timestamp

log = structlog.get_logger(__name__)

LOCK_NAME = "daemon.lock"
STATE_NAME = "schedule.json"


class DaemonRunning(BackupdError):
    """Another daemon holds this state_dir."""

    exit_code = EXIT_USAGE


class DaemonLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise BackupdError(f"state_dir {self.path.parent}: cannot create the daemon lock: {exc.strerror}",
                               hint="check daemon.state_dir and its permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise DaemonRunning(
                f"another backupd daemon is already running on state_dir {self.path.parent}{pid}",
                hint="stop it first, or give this one its own daemon.state_dir",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ScheduleState:
    """Thread-safe view of ``schedule.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_NAME
        self._lock = threading.Lock()
        self._data: dict[str, Any] = self._load()

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                return data
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("schedule state unreadable; starting without history", path=str(self.path), error=str(exc))
        return {}

    def _save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(tmp, "w") as handle:
                json.dump(self._data, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not save schedule state", path=str(self.path), error=str(exc))

    def last_run(self, job_id: str) -> dt.datetime | None:
        with self._lock:
            text = self._data.get("last_run", {}).get(job_id)
        try:
            return parse_timestamp(text) if text else None
        except ValueError:
            return None

    def set_last_run(self, job_id: str, moment: dt.datetime, *, only_if_missing: bool = False) -> None:
        with self._lock:
            runs = self._data.setdefault("last_run", {})
            if only_if_missing and job_id in runs:
                return
            previous = runs.get(job_id)
            if previous and not only_if_missing and _parse(previous) >= moment:
                return  # never move backwards (two events racing)
            runs[job_id] = format_timestamp(moment)
            self._save()

    def integrity_reads(self, job: str) -> dict[str, dt.datetime]:
        with self._lock:
            raw = dict(self._data.get("integrity", {}).get(job, {}))
        result = {}
        for backup_id, text in raw.items():
            try:
                result[backup_id] = parse_timestamp(text)
            except ValueError:
                continue
        return result

    def set_integrity_reads(self, job: str, reads: dict[str, dt.datetime]) -> None:
        with self._lock:
            self._data.setdefault("integrity", {})[job] = {k: format_timestamp(v) for k, v in sorted(reads.items())}
            self._save()


def _parse(text: str) -> dt.datetime:
    try:
        return parse_timestamp(text)
    except ValueError:
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)
