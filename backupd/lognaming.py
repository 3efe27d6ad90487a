"""How a driver's archived logs are named: where each object goes and how the names order.

The core knows a log kind ("wal", "binlog", "oplog") only as a folder of the repository. The
driver that archives a kind describes its names with a ``LogNaming`` in its descriptor
(``DriverDescriptor.log_namings``), so the repository layout, listings and the retention
planner hold no database's naming rules. A log's *name* is what the archive calls it
("<dir>/<file>", e.g. a timeline and a segment); its storage key may put it in a sub-folder
of ``<dir>`` (``folder``) so that no folder grows with the whole archive.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable


def _nothing(_: str) -> str | None:
    return None


@dataclass(frozen=True)
class LogNaming:
    kind: str
    #: The sub-folder of its directory a log file's object goes in (given the file part of its name), or
    #: None to lie beside the others. It must be a prefix of the file part: a listing by a name prefix up
    #: to the folder's length then finds the object in either layout (before and after the folders).
    folder: Callable[[str], str | None] = _nothing
    #: Names sort in archive order across their directories too (not only within one).
    ordered_across: bool = False
    #: Why retention keeps a log whatever the backups need (a reason like "timeline history"); None for most.
    always_keep: Callable[[str], str | None] = _nothing

    @property
    def foldered(self) -> bool:
        """Whether logs go in sub-folders (the repository had none before: ``backupd migrate`` moves them)."""
        return self.folder is not _nothing

    def split(self, name: str) -> tuple[str, str]:
        """(directory, file) of a log name; the directory is "" for a name without one."""
        directory, _, file = name.rpartition("/")
        return directory, file

    def folder_of(self, name: str) -> str | None:
        return self.folder(self.split(name)[1])


@functools.cache
def naming(kind: str) -> LogNaming:
    """The naming the driver that archives ``kind`` describes; flat (no folders, no order across) when none does."""
    from backupd import plugins
    from backupd.errors import PluginError

    for driver in plugins.known(plugins.DRIVER_GROUP):
        try:
            described = plugins.driver_descriptor(driver).log_namings
        except PluginError:
            continue  # a broken plugin is reported when a job uses it
        for candidate in described:
            if candidate.kind == kind:
                return candidate
    return LogNaming(kind)
