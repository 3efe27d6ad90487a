"""A broken configuration is refused at start, every error listed with its dotted path."""

from __future__ import annotations

from pathlib import Path

import pytest

from backupd.errors import ConfigError
from backupd.settings import load_settings
from support import error_lines, run_backupd, write_config

RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"


def base(tmp_path: Path) -> dict[str, dict[str, object]]:
    return {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.local": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [RECIPIENT]},
        "jobs.orders": {"driver": "sqlite", "path": str(tmp_path / "db.sqlite3"), "storage": "local"},
    }


def test_every_bad_key_is_listed_at_once_with_exit_2(tmp_path: Path) -> None:
    tables = base(tmp_path)
    tables["daemon"]["metrics_listen"] = "nowhere"
    tables["storage.local"]["pth"] = "/typo"
    tables["jobs.orders"].update({"schedule": "0 25 * * *", "compression": "gzip", "pathh": "/x"})
    tables["jobs.orders"]["retention"] = {"keep_lst": 3}
    tables["jobs.other"] = {"driver": "nosuchdb", "storage": "offsite"}
    config = write_config(tmp_path / "bad.toml", tables)

    result = run_backupd("list", config=config)

    assert result.code == 2
    lines = "\n".join(error_lines(result.err))
    for expected in [
        "daemon.metrics_listen: expected HOST:PORT",
        "(got 'nowhere')",
        "storage.local.pth: unknown key (got '/typo')",
        "jobs.orders.schedule: cron hour: '25' is not in 0-23 (got '0 25 * * *')",
        "jobs.orders.compression: only zstd is supported",
        "jobs.orders.pathh: unknown key (got '/x')",
        "jobs.orders.retention.keep_lst: unknown key (got 3)",
        "jobs.other.driver: unknown driver 'nosuchdb' (known: ",
        "jobs.other.storage: no [storage.offsite] table",
    ]:
        assert expected in lines, f"{expected!r} missing from:\n{lines}"


def test_missing_file_and_invalid_toml_exit_2(tmp_path: Path) -> None:
    result = run_backupd("list", config=tmp_path / "absent.toml")
    assert result.code == 2
    assert "absent.toml: configuration file not found" in result.err
    broken = tmp_path / "broken.toml"
    broken.write_text("[jobs\n")
    result = run_backupd("list", config=broken)
    assert result.code == 2
    assert "not valid TOML" in result.err


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path / "c.toml", base(tmp_path))
    monkeypatch.setenv("BACKUPD_JOBS__ORDERS__SCHEDULE", "@every 15m")
    monkeypatch.setenv("BACKUPD_JOBS__ORDERS__PATH", "/srv/other.sqlite3")
    monkeypatch.setenv("BACKUPD_DAEMON__METRICS_LISTEN", "127.0.0.1:9999")
    settings = load_settings(config)
    assert settings.jobs["orders"].schedule == "@every 15m"
    assert str(settings.driver_options("orders").path) == "/srv/other.sqlite3"
    assert settings.daemon.metrics_listen == "127.0.0.1:9999"


def test_bad_environment_value_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path / "c.toml", base(tmp_path))
    monkeypatch.setenv("BACKUPD_JOBS__ORDERS__ARCHIVE_LOGS", "maybe")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert any(line.startswith("jobs.orders.archive_logs: ") and "(got 'maybe')" in line for line in info.value.errors)


@pytest.mark.parametrize("schedule", ["0 2 * * *", "*/15 * * * 1-5", "@every 90s", "@every 1h30m", "@daily"])
def test_valid_schedules(tmp_path: Path, schedule: str) -> None:
    tables = base(tmp_path)
    tables["jobs.orders"]["schedule"] = schedule
    assert load_settings(write_config(tmp_path / "c.toml", tables)).jobs["orders"].schedule == schedule


@pytest.mark.parametrize("schedule", ["0 2 * *", "@every", "@every soon", "61 * * * *", "* * 0 * *"])
def test_invalid_schedules(tmp_path: Path, schedule: str) -> None:
    tables = base(tmp_path)
    tables["jobs.orders"]["schedule"] = schedule
    with pytest.raises(ConfigError) as info:
        load_settings(write_config(tmp_path / "c.toml", tables))
    assert info.value.errors[0].startswith("jobs.orders.schedule: ")


def test_secret_in_a_value_is_not_echoed(tmp_path: Path) -> None:
    tables = base(tmp_path)
    tables["jobs.orders"]["dsn"] = "postgresql://admin:hunter2@db/orders"
    result = run_backupd("list", config=write_config(tmp_path / "c.toml", tables))
    assert result.code == 2
    assert "jobs.orders.dsn: unknown key" in result.err
    assert "hunter2" not in result.err


def test_unknown_job_is_a_usage_error(tmp_path: Path) -> None:
    result = run_backupd("backup", "nosuch", config=write_config(tmp_path / "c.toml", base(tmp_path)))
    assert result.code == 2
    assert "unknown job 'nosuch' (configured jobs: orders)" in result.err


def test_cpu_priority_is_the_drivers_unless_set_and_checked(tmp_path: Path) -> None:
    from backupd.context import JobContext
    from drivers.mysql.driver import MysqlDriver

    tables = base(tmp_path)
    settings = load_settings(write_config(tmp_path / "ok.toml", tables))
    assert settings.job("orders").cpu_priority is None
    ctx = JobContext(settings, "orders")
    try:
        assert ctx.driver.cpu_priority == "normal"  # the base default; MySQL's dump leaves room for "low"
    finally:
        ctx.close()
    assert MysqlDriver.default_cpu_priority == "low"
    tables["jobs.orders"]["cpu_priority"] = "idle"
    ctx = JobContext(load_settings(write_config(tmp_path / "idle.toml", tables)), "orders")
    try:
        assert ctx.driver.cpu_priority == "idle"
    finally:
        ctx.close()
    tables["jobs.orders"]["cpu_priority"] = "high"
    result = run_backupd("list", config=write_config(tmp_path / "bad.toml", tables))
    assert result.code == 2
    assert "jobs.orders.cpu_priority: Input should be 'low', 'idle' or 'normal' (got 'high')" in error_lines(result.err)[1]
