"""Find drivers and storage backends through their entry points.

Built-ins register exactly like third-party packages (groups ``backupd.drivers``
and ``backupd.storage`` in pyproject.toml); nothing here names one. Plugins are
imported on first use and checked to be what their group promises. A driver's
entry point names its ``DriverDescriptor`` (``backupd.descriptor``), so reading a
configuration never imports a driver; ``driver_class`` imports it when a job runs.
An entry point naming a Driver subclass directly still works (it is imported at once).
"""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

from backupd.descriptor import DriverDescriptor
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
def _load(group: str, name: str) -> object:
    points = _entry_points(group)
    if name not in points:
        raise PluginError(f"unknown {_kind(group)} {name!r} (known: {', '.join(known(group)) or 'none'})")
    try:
        return points[name].load()
    except Exception as exc:  # a broken third-party plugin must not look like a typo
        raise PluginError(f"{_kind(group)} {name!r} failed to load: {exc}") from exc


def _kind(group: str) -> str:
    return "driver" if group == DRIVER_GROUP else "storage type"


def driver_descriptor(name: str) -> DriverDescriptor:
    """The driver's name, options model, methods and capabilities, without importing the driver."""
    loaded = _load(DRIVER_GROUP, name)
    if isinstance(loaded, DriverDescriptor):
        return loaded
    from backupd.driver import Driver

    if isinstance(loaded, type) and issubclass(loaded, Driver):
        return DriverDescriptor.of(name, loaded)
    value = _entry_points(DRIVER_GROUP)[name].value
    raise PluginError(f"driver {name!r} ({value}) is not a Driver subclass or a DriverDescriptor")


def driver_class(name: str) -> "type[Driver]":
    return driver_descriptor(name).load()


def storage_class(name: str) -> "type[Storage]":
    from backupd.storage import Storage

    loaded = _load(STORAGE_GROUP, name)
    if not (isinstance(loaded, type) and issubclass(loaded, Storage)):
        value = _entry_points(STORAGE_GROUP)[name].value
        raise PluginError(f"storage type {name!r} ({value}) is not a Storage subclass")
    return loaded
