"""A sqlite job's own configuration keys."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from backupd.driver import DriverOptions


class SqliteOptions(DriverOptions):
    path: Path
    busy_timeout: float = Field(default=30.0, gt=0, description="seconds to wait for a writer's lock")
