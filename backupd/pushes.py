"""The outcome of every log push (WAL segment, binlog, oplog slice), in one place.

Drivers report each push here; this records the metrics (in a process that
serves them) and remembers, per job, whether pushes are failing right now, which
the daemon's ``/healthz`` reports: an archiver whose process runs but whose
pushes fail (storage down, spool full) is not healthy.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from backupd.served_metrics import served


@dataclass(frozen=True)
class Failing:
    since: float  # when the first failure of this run of failures happened (epoch seconds)
    attempts: int
    error: str


_failing: dict[str, Failing] = {}
_lock = threading.Lock()


def succeeded(job: str) -> None:
    with _lock:
        _failing.pop(job, None)
    if metrics := served():
        metrics.ARCHIVE_LAST_SUCCESS.labels(job).set(time.time())


def failed(job: str, error: BaseException | str) -> None:
    text = str(error) or type(error).__name__
    with _lock:
        before = _failing.get(job)
        _failing[job] = Failing(before.since if before else time.time(), (before.attempts if before else 0) + 1,
                                text)
    if metrics := served():
        metrics.ARCHIVE_FAILURES.labels(job).inc()


def failing() -> dict[str, Failing]:
    """Jobs whose latest push failed (none succeeded since)."""
    with _lock:
        return dict(_failing)
