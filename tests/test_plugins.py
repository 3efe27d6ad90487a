"""Drivers and storage backends are found through entry points, built-ins included."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from backupd import plugins
from backupd.driver import Driver
from backupd.errors import PluginError
from backupd.storage import Storage


def test_builtins_register_as_entry_points() -> None:
    assert {"sqlite"} <= set(plugins.known(plugins.DRIVER_GROUP))
    assert {"filesystem", "s3"} <= set(plugins.known(plugins.STORAGE_GROUP))
    assert issubclass(plugins.driver_class("sqlite"), Driver)
    assert issubclass(plugins.storage_class("s3"), Storage)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(PluginError, match=r"unknown driver 'oracle' \(known: .*sqlite"):
        plugins.driver_class("oracle")


def fake_group(monkeypatch: pytest.MonkeyPatch, **points: str) -> None:
    eps = {name: EntryPoint(name, value, plugins.DRIVER_GROUP) for name, value in points.items()}
    monkeypatch.setattr(plugins, "_entry_points", lambda group: eps)
    plugins._load.cache_clear()


def test_a_plugin_of_the_wrong_type_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_group(monkeypatch, bogus="collections:OrderedDict")
    try:
        with pytest.raises(PluginError, match="driver 'bogus' .* is not a Driver subclass"):
            plugins.driver_class("bogus")
    finally:
        plugins._load.cache_clear()


def test_a_plugin_that_fails_to_import_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_group(monkeypatch, broken="no_such_module_anywhere:Driver")
    try:
        with pytest.raises(PluginError, match="driver 'broken' failed to load: No module named"):
            plugins.driver_class("broken")
    finally:
        plugins._load.cache_clear()
