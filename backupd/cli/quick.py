"""Fast paths for the commands PostgreSQL runs once per WAL file.

``wal-push`` with a daemon running and ``wal-fetch`` of a prefetched segment need
only ``daemon.state_dir`` and the job name, so they read just those from the
TOML file (and the environment) instead of validating the whole configuration
and loading every plugin. Anything unusual falls back to the full path, which
reports problems properly.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any

from backupd.paths import DEFAULT_CONFIG, DEFAULT_STATE_DIR


def _env(name: str) -> str | None:
    wanted = name.lower()
    for key, value in os.environ.items():
        if key.lower() == wanted:
            return value
    return None


def raw_config(args: argparse.Namespace) -> dict[str, Any]:
    path = Path(args.config or os.environ.get("BACKUPD_CONFIG") or DEFAULT_CONFIG)
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def state_dir(raw: dict[str, Any]) -> Path:
    override = _env("BACKUPD_DAEMON__STATE_DIR")
    if override:
        return Path(override)
    daemon = raw.get("daemon")
    value = daemon.get("state_dir") if isinstance(daemon, dict) else None
    return Path(value) if isinstance(value, str) else DEFAULT_STATE_DIR


def wal_job(raw: dict[str, Any], job: str | None) -> str | None:
    """The named job, or the single postgres job archiving logs; None when unsure."""
    if job:
        return job
    jobs = raw.get("jobs")
    if not isinstance(jobs, dict):
        return None
    found = [name for name, table in jobs.items()
             if isinstance(table, dict) and table.get("driver") == "postgres" and table.get("archive_logs") is True]
    return found[0] if len(found) == 1 else None
