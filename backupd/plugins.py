"""Find drivers and storage backends through their entry points.

Built-ins register exactly like third-party packages (groups ``backupd.drivers``
and ``backupd.storage`` in pyproject.toml); nothing here names one. Plugins are
imported on first use and checked to be what their group promises.
"""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

from backupd.errors import PluginError

if TYPE_CHECKING:
    from backupd.driver import Driver
    from backupd.storage import Storage

DRIVER_GROUP = "backupd.drivers"
STORAGE_GROUP = "backupd.storage"


@functools.cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def known(group: str) -> list[str]:
    return sorted(_entry_points(group))


@functools.cache
def _load(group: str, name: str, base_path: str) -> type:
    points = _entry_points(group)
    if name not in points:
        raise PluginError(f"unknown {_kind(group)} {name!r} (known: {', '.join(known(group)) or 'none'})")
    try:
        loaded = points[name].load()
    except Exception as exc:  # a broken third-party plugin must not look like a typo
        raise PluginError(f"{_kind(group)} {name!r} failed to load: {exc}") from exc
    module_name, _, class_name = base_path.rpartition(".")
    module = __import__(module_name, fromlist=[class_name])
    base = getattr(module, class_name)
    if not (isinstance(loaded, type) and issubclass(loaded, base)):
        raise PluginError(f"{_kind(group)} {name!r} ({points[name].value}) is not a {class_name} subclass")
    return loaded


def _kind(group: str) -> str:
    return "driver" if group == DRIVER_GROUP else "storage type"


def driver_class(name: str) -> "type[Driver]":
    return _load(DRIVER_GROUP, name, "backupd.driver.Driver")


def storage_class(name: str) -> "type[Storage]":
    return _load(STORAGE_GROUP, name, "backupd.storage.Storage")
