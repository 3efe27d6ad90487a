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


DRIVER_JOBS = """
[storage.main]
type = "filesystem"
path = "{repo}"
[jobs.pg]
driver = "postgres"
storage = "main"
dsn = "postgresql://postgres@127.0.0.1:5432/postgres"
[jobs.my]
driver = "mysql"
storage = "main"
dsn = "mysql://root@127.0.0.1:3306"
[jobs.mg]
driver = "mongodb"
storage = "main"
dsn = "mongodb://127.0.0.1:27017"
[jobs.rd]
driver = "redis"
storage = "main"
dsn = "redis://127.0.0.1:6379"
[jobs.sq]
driver = "sqlite"
storage = "main"
path = "{repo}/x.db"
"""


def _probe(tmp_path, code: str) -> str:
    import subprocess
    import sys

    config = tmp_path / "c.toml"
    config.write_text(DRIVER_JOBS.format(repo=tmp_path))
    script = f"import sys\nfrom backupd.settings import load_settings\nsettings = load_settings({str(config)!r})\n{code}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()


def test_loading_a_configuration_imports_no_driver(tmp_path) -> None:
    """Each job's options are validated through its driver's descriptor; the drivers load when a job runs."""
    out = _probe(tmp_path, "print(sorted(m for m in sys.modules if m.endswith('.driver') and m.startswith('drivers')))")
    assert out == "[]"


def test_which_drivers_loaded_does_not_decide_whether_a_command_records_metrics(tmp_path) -> None:
    """Only a process serving /metrics imports backupd.metrics; drivers record through served_metrics."""
    out = _probe(tmp_path, "from backupd.context import JobContext\n"
                           "for job in sorted(settings.jobs): JobContext(settings, job).driver.log_archivers()\n"
                           "from backupd.served_metrics import served\n"
                           "print(served(), 'backupd.metrics' in sys.modules, 'prometheus_client' in sys.modules)")
    assert out == "None False False"
