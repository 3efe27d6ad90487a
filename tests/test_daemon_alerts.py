"""The real daemon driven into the failures config/alerts.yml must see: counters at 0 before the
first failure, a failed verification run from the CLI, never verified, a reload that restarts
nothing, an archiver in a crash loop. (MariaDB down and binlog lag across a reload: test_mysql_daemon.)"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from core_fixtures import Keys, make_sample_db
from daemon_support import DaemonProcess, free_port, start_daemon  # noqa: F401 (fixture)
from support import run_backupd, write_config


def sqlite_config(tmp_path: Path, keys: Keys, port: int, *, job: dict | None = None, storage: Path | None = None,
                  name: str = "backupd.toml") -> Path:
    db = tmp_path / "shop.sqlite3"
    if not db.exists():
        make_sample_db(db)
    return write_config(tmp_path / name, {
        "daemon": {"state_dir": str(tmp_path / "state"), "metrics_listen": f"127.0.0.1:{port}",
                   "shutdown_timeout": "10s", "repository_poll_interval": "1s"},
        "storage.main": {"type": "filesystem", "path": str(storage or tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.shop": {"driver": "sqlite", "path": str(db), "storage": "main", **(job or {})},
    })


def runs(d: DaemonProcess, result: str, job: str = "shop") -> float | None:
    return d.metric("backupd_backup_runs_total", job=job, method="logical", type="full", result=result)


def test_counters_are_zero_from_the_start_so_the_first_failure_is_an_increase(tmp_path: Path, keys: Keys,
                                                                              start_daemon) -> None:
    port = free_port()
    broken = tmp_path / "not-a-directory"
    broken.write_text("storage is down\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = sqlite_config(tmp_path, keys, port, job={"schedule": "@every 3s"}, storage=broken)
    config.write_text(config.read_text() + "\n" + write_config(tmp_path / "extra.toml", {
        "jobs.logs": {"driver": "slowtest", "workdir": str(workdir), "storage": "main", "archive_logs": True},
    }).read_text())
    d = start_daemon(config, port)
    d.wait_for(lambda: d.get("/metrics")[0] == 200, what="metrics served")
    scrape = d.metrics()

    def value(name: str, **labels: str) -> float | None:
        return scrape.get((name, frozenset(labels.items())))

    # Before any run: every counter of every job is there, at 0.
    for result in ("success", "failure"):
        assert value("backupd_backup_runs_total", job="shop", method="logical", type="full", result=result) == 0
        assert value("backupd_backup_runs_total", job="logs", method="logical", type="full", result=result) == 0
    for job in ("shop", "logs"):
        assert value("backupd_backup_missed_runs_total", job=job) == 0
        assert value("backupd_retention_deleted_objects_total", job=job) == 0
        assert value("backupd_verification_last_success_timestamp_seconds", job=job) == 0  # never verified
    assert value("backupd_archive_failures_total", job="logs") == 0
    assert value("backupd_archive_gaps_total", job="logs") == 0
    assert value("backupd_archive_failures_total", job="shop") is None  # shop archives no logs
    for event in ("error", "missed", "max_instances"):
        assert value("backupd_scheduler_events_total", job="shop", task="backup", event=event) == 0
    assert value("backupd_job_consecutive_failures", job="shop", task="backup") == 0
    assert value("backupd_config_reloads_total", result="failure") == 0

    # The first scheduled run fails: the failure counter goes from 0 to 1 (an increase alerts see).
    d.wait_for(lambda: runs(d, "failure") == 1, what="the first failure counted")
    assert runs(d, "success") == 0
    d.wait_for(lambda: d.metric("backupd_job_consecutive_failures", job="shop", task="backup") == 1,
               what="the failure in a row")
    assert d.stop() == 0


def test_a_failed_verify_from_the_cli_reaches_the_daemons_metrics(tmp_path: Path, keys: Keys,
                                                                  start_daemon) -> None:
    port = free_port()
    config = sqlite_config(tmp_path, keys, port)
    assert run_backupd("backup", "shop", config=config).code == 0
    d = start_daemon(config, port)  # no schedule: only the repository tells it about verifications
    d.wait_ready()
    d.wait_for(lambda: d.metric("backupd_repository_backups", job="shop") == 1, what="warm-up")
    assert d.metric("backupd_verification_last_success_timestamp_seconds", job="shop") == 0  # never verified
    assert d.metric("backupd_verification_last_result", job="shop") is None

    # `backupd verify` on the command line, with a check that fails: exit 3, and the daemon sees it.
    failing = sqlite_config(tmp_path, keys, port, name="failing.toml",
                            job={"verify": {"checks": ["SELECT count(*) > 1000000 FROM orders"]}})
    assert run_backupd("verify", "shop", config=failing).code == 3
    d.wait_for(lambda: d.metric("backupd_verification_last_result", job="shop") == 0,
               what="the CLI's failed verification in the metrics")
    assert d.metric("backupd_verification_last_success_timestamp_seconds", job="shop") == 0
    assert any(r.get("event") == "the newest verification report says failed" for r in d.records())

    # A passing one afterwards: result 1, and the time of the report.
    before = time.time()
    assert run_backupd("verify", "shop", config=config).code == 0
    d.wait_for(lambda: d.metric("backupd_verification_last_result", job="shop") == 1,
               what="the CLI's passed verification in the metrics")
    assert d.metric("backupd_verification_last_success_timestamp_seconds", job="shop") >= before - 1
    assert d.metric("backupd_verification_last_restore_seconds", job="shop") > 0
    assert d.stop() == 0


def archivers_config(tmp_path: Path, keys: Keys, port: int, **jobs: dict) -> Path:
    tables: dict[str, dict] = {
        "daemon": {"state_dir": str(tmp_path / "state"), "metrics_listen": f"127.0.0.1:{port}",
                   "archiver_backoff_max": "1s"},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient]},
    }
    for name, options in jobs.items():
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        tables[f"jobs.{name}"] = {"driver": "slowtest", "workdir": str(workdir), "storage": "main",
                                  "archive_logs": True, **options}
    return write_config(tmp_path / "backupd.toml", tables)


def attempts(tmp_path: Path, job: str) -> int:
    path = tmp_path / job / "archiver.attempts"
    return int(path.read_text()) if path.exists() else 0


def test_a_reload_restarts_only_the_archivers_of_changed_jobs(tmp_path: Path, keys: Keys, start_daemon) -> None:
    port = free_port()
    config = archivers_config(tmp_path, keys, port, one={}, two={})
    d = start_daemon(config, port)
    d.wait_ready()
    d.wait_for(lambda: attempts(tmp_path, "one") == 1 and attempts(tmp_path, "two") == 1, what="both archivers")

    d.signal(signal.SIGHUP)  # the same file: nothing restarts
    d.wait_for(lambda: d.metric("backupd_config_reloads_total", result="success") == 1, what="reload")
    reloaded = [r for r in d.records() if r.get("event") == "configuration reloaded"]
    assert reloaded[-1]["reloaded"] == []
    time.sleep(1)
    assert (attempts(tmp_path, "one"), attempts(tmp_path, "two")) == (1, 1)
    assert not [r for r in d.records() if r.get("event") == "log archiver stopped"]

    archivers_config(tmp_path, keys, port, one={}, two={"size": 4096})  # job two changes
    d.signal(signal.SIGHUP)
    d.wait_for(lambda: d.metric("backupd_config_reloads_total", result="success") == 2, what="second reload")
    d.wait_for(lambda: attempts(tmp_path, "two") == 2, what="two's archiver restarted")
    time.sleep(1)
    assert attempts(tmp_path, "one") == 1
    reloaded = [r for r in d.records() if r.get("event") == "configuration reloaded"]
    assert reloaded[-1]["reloaded"] == ["two"]
    stopped = [r.get("archiver") for r in d.records() if r.get("event") == "log archiver stopped"]
    assert stopped == ["slowlog:two"]
    assert d.health()[0] == 200

    archivers_config(tmp_path, keys, port, one={})  # job two removed: its series go
    d.signal(signal.SIGHUP)
    d.wait_for(lambda: d.metric("backupd_config_reloads_total", result="success") == 3, what="third reload")
    d.wait_for(lambda: d.metric("backupd_archiver_up", job="two", archiver="slowlog:two") is None,
               what="two's series dropped")
    assert d.metric("backupd_backup_runs_total", job="two", method="logical", type="full", result="failure") is None
    assert d.metric("backupd_archiver_up", job="one", archiver="slowlog:one") == 1
    assert attempts(tmp_path, "one") == 1
    assert d.stop() == 0


def test_an_archiver_that_dies_at_every_start_stays_down(tmp_path: Path, keys: Keys, start_daemon) -> None:
    """Each attempt connects for a moment, then drops (the database is down): never "ok" in between."""
    port = free_port()
    config = archivers_config(tmp_path, keys, port, flaky={"archiver_failures": 10_000,
                                                           "archiver_fails_after": 0.5})
    d = start_daemon(config, port)
    labels = {"job": "flaky", "archiver": "slowlog:flaky"}
    d.wait_for(lambda: (d.metric("backupd_archiver_restarts_total", **labels) or 0) >= 1, what="a first death")
    samples = []
    deadline = time.monotonic() + 6  # several attempts of 0.5 s each, with 1 s of backoff between
    while time.monotonic() < deadline:
        status, health = d.health()
        samples.append((d.metric("backupd_archiver_up", **labels), status))
        time.sleep(0.1)
    assert (d.metric("backupd_archiver_restarts_total", **labels) or 0) >= 4
    assert set(samples) == {(0.0, 503)}, samples
    reasons = d.health()[1]["reasons"]
    assert any("log archiver slowlog:flaky of job flaky is restarting: DriverError: archiver attempt" in r
               for r in reasons), reasons
    assert d.stop() == 0
