"""The metrics registry, only in a process that serves one.

The daemon imports ``backupd.metrics`` before any job runs and serves it on /metrics. A
one-shot command (``backupd backup``, ``wal-push`` without a daemon) serves no registry: what
it would record is lost at exit, and importing prometheus_client costs it ~20 ms before its
work can start. Code that may run in either kind of process (the core's backup and gap
bookkeeping, drivers' archivers and pushes) records through ``served()`` and never imports
``backupd.metrics``: whether a command records must not depend on which module loaded first.
"""

from __future__ import annotations

import sys
from types import ModuleType


def served() -> ModuleType | None:
    return sys.modules.get("backupd.metrics")
