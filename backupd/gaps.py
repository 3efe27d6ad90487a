"""Counting gaps in the archived logs: each one once per process, whoever finds it first.

The binlog archiver finds a purged binlog the moment it starts after it; the
daemon's ``GapWatch`` finds any gap in its periodic look at the archive. Both
report the missing log by the same message ("missing binlog 21/mysql-bin.000005",
as ``Driver.log_reach`` words it), so ``backupd_archive_gaps_total`` rises once.
"""

from __future__ import annotations

import threading
from typing import Iterable

from backupd.served_metrics import served

_seen: dict[str, set[str]] = {}
_lock = threading.Lock()


def record(job: str, gaps: Iterable[str]) -> list[str]:
    """Count the gaps of ``job`` not counted before; return them."""
    with _lock:
        seen = _seen.setdefault(job, set())
        new = [gap for gap in dict.fromkeys(gaps) if gap not in seen]
        seen.update(new)
    if new and (metrics := served()):
        metrics.ARCHIVE_GAPS.labels(job).inc(len(new))
    return new
