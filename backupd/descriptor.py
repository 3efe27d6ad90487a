"""What a driver plugin's entry point names: a light description of the driver, read without importing it.

Loading a configuration needs each job's options model and methods; listing
which jobs archive WAL needs the driver's capabilities. None of that needs the
driver itself (its tools, its client library, its dozen modules), so an entry
point in the ``backupd.drivers`` group names a ``DriverDescriptor`` and the
driver class is imported by ``load()`` only when a job's driver is created.
A descriptor module imports its options model and nothing heavier.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel

from backupd.errors import PluginError
from backupd.lognaming import LogNaming

if TYPE_CHECKING:
    from backupd.driver import Driver

#: Capability: the driver serves ``backupd wal-push``/``wal-fetch`` (PostgreSQL's archive and restore commands).
WAL_ARCHIVING = "wal-archiving"


@dataclass(frozen=True)
class DriverDescriptor:
    name: str
    #: The job's own keys (connection, tools); validated when the configuration loads.
    options_model: type[BaseModel]
    #: Methods the driver supports; the first is the default.
    methods: tuple[str, ...]
    #: ``module:Class`` of the Driver subclass, imported on first use.
    driver: str
    capabilities: frozenset[str] = field(default_factory=frozenset)
    #: How the logs the driver archives are named: their folders in the repository, their order, what
    #: retention always keeps (``backupd.lognaming``).
    log_namings: tuple[LogNaming, ...] = ()

    def load(self) -> "type[Driver]":
        from backupd.driver import Driver

        module_name, _, class_name = self.driver.partition(":")
        try:
            loaded = getattr(importlib.import_module(module_name), class_name)
        except Exception as exc:  # a broken third-party plugin must not look like a typo
            raise PluginError(f"driver {self.name!r} failed to load: {exc}") from exc
        if not (isinstance(loaded, type) and issubclass(loaded, Driver)):
            raise PluginError(f"driver {self.name!r} ({self.driver}) is not a Driver subclass")
        return loaded

    @classmethod
    def of(cls, name: str, driver: "type[Driver]") -> DriverDescriptor:
        """The descriptor of a driver class an entry point names directly (already imported)."""
        return _Loaded(name, driver.options_model, tuple(driver.methods), f"{driver.__module__}:{driver.__qualname__}",
                       frozenset(driver.capabilities), tuple(driver.log_namings), driver)


@dataclass(frozen=True)
class _Loaded(DriverDescriptor):
    cls: "type[Driver] | None" = None

    def load(self) -> "type[Driver]":
        assert self.cls is not None
        return self.cls
