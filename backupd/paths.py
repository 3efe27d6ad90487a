"""Well-known local paths, kept import-light for the per-WAL-file fast paths."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG = Path("/etc/backupd/backupd.toml")
DEFAULT_STATE_DIR = Path("/var/lib/backupd")


def spool_dir(state_dir: Path, job: str) -> Path:
    return state_dir / "spool" / job


def wal_fetch_spool(state_dir: Path, job: str) -> Path:
    """Where ``wal-fetch`` keeps prefetched segments: complete files only (written, then renamed)."""
    return spool_dir(state_dir, job) / "wal-fetch"


#: Held (flock) by the background ``wal-fetch --prefetch-after`` while it fills the spool.
PREFETCH_LOCK = ".prefetch.lock"
