"""Well-known local paths."""

from __future__ import annotations

from pathlib import Path

from backupd import spool

DEFAULT_CONFIG = Path("/etc/backupd/backupd.toml")
DEFAULT_STATE_DIR = Path("/var/lib/backupd")


def spool_dir(state_dir: Path, job: str) -> Path:
    return state_dir / "spool" / job


def wal_fetch_spool(state_dir: Path, job: str) -> Path:
    """Where ``wal-fetch`` keeps prefetched segments (``backupd.spool`` describes its files)."""
    return Path(spool.directory(str(state_dir), job))


def file_maps_dir(state_dir: Path, job: str) -> Path:
    """Where a host keeps the file maps of its committed physical backups (``drivers.postgres.mapstore``)."""
    return state_dir / "filemaps" / job
