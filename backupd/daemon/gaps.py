"""The daemon's eye on gaps in the archived logs: each gap counted once, when the daemon first sees it.

A gap breaks point-in-time recovery past it, so ``backupd_archive_gaps_total``
must rise the moment one exists, not only when someone runs ``verify``. The
watch follows the archive from the oldest backup that records log positions
(so every window is covered, in one listing) and counts every missing log it
has not counted before.
"""

from __future__ import annotations

import structlog

from backupd import gaps
from backupd.context import JobContext
from backupd.manifest import PitrStart

log = structlog.get_logger(__name__)


def watch(ctx: JobContext) -> list[str]:
    """Count the newly seen gaps of one job; return them (messages naming the missing logs)."""
    with_logs = [m for m in ctx.repository.manifests() if PitrStart.recorded(m)]
    if not with_logs:
        return []
    oldest = min(with_logs, key=lambda m: m.finished_at)
    reach = ctx.log_reaches([oldest]).get(oldest.backup_id)
    if reach is None:
        return []
    new = gaps.record(ctx.name, reach.missing)
    if new:
        log.error("gap in the archived logs: point-in-time recovery past it is impossible", job=ctx.name,
                  backup_id=oldest.backup_id, first_missing=reach.first_missing, gaps=len(new))
    return new
