"""``backupd status`` and ``check --json`` on a SQLite job: from storage alone, after failures, beside a daemon.
(A broken PITR window in ``status``: test_mysql_pitr.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from core_fixtures import Keys
from daemon_support import PLUGINS, free_port, start_daemon  # noqa: F401 (fixture)
from support import run_backupd, write_config
from test_daemon_alerts import archivers_config, sqlite_config


def status(config: Path, env: dict[str, str] | None = None) -> dict:
    [job] = json.loads(run_backupd("status", "shop", "--json", config=config, env=env, check=True).out)["jobs"]
    return job


def test_status_tells_backups_runs_verification_and_pins_from_storage_alone(tmp_path: Path, keys: Keys) -> None:
    config = sqlite_config(tmp_path, keys, free_port())
    empty = status(config)
    assert empty["state"] == "warning" and empty["warnings"] == ["no backup yet"]
    assert empty["backups"] == {"count": 0, "partial": [], "newest": []} and empty["verification"] is None
    assert empty["archive_lag_seconds"] == "not available: no daemon runs on this host"

    first = run_backupd("backup", "shop", config=config, check=True).out.strip()
    newest = run_backupd("backup", "shop", config=config, check=True).out.strip()
    assert run_backupd("pin", first, config=config).code == 0
    (tmp_path / "repo" / "shop" / "backups" / "20200101T000000Z").mkdir()  # a run killed before its manifest
    (tmp_path / "repo" / "shop" / "backups" / "20200101T000000Z" / "db.zst.age").write_bytes(b"x")
    s = status(config)
    assert s["state"] == "warning" and s["warnings"] == ["never verified"] and s["problems"] == []
    assert s["backups"]["count"] == 2 and s["backups"]["partial"] == ["20200101T000000Z"]
    [latest] = s["backups"]["newest"]
    assert (latest["backup_id"], latest["method"], latest["type"], latest["result"]) == (newest, "logical", "full",
                                                                                          "success")
    assert s["last_run"]["result"] == "success" and s["last_run"]["backup_id"] == newest
    assert s["pins"] == [first]
    assert s["archive"] is None and s["pitr"] is None
    assert s["untrusted_objects"].startswith("not available") and s["lagging_copies"].startswith("not available")

    # A failed verification and then a failed backup: both are problems, with their errors.
    failing = sqlite_config(tmp_path, keys, free_port(), name="failing.toml",
                            job={"verify": {"checks": ["SELECT count(*) > 1000000 FROM orders"]}})
    assert run_backupd("verify", "shop", config=failing).code == 3
    (tmp_path / "shop.sqlite3").rename(tmp_path / "moved.sqlite3")
    assert run_backupd("backup", "shop", config=config).code == 1
    s = status(config)
    assert s["state"] == "error"
    assert s["verification"]["result"] == "failed" and s["verification"]["backup_id"] == newest
    assert s["verification"]["last_passed_at"] is None
    assert s["last_run"]["result"] == "failure" and "shop.sqlite3" in s["last_run"]["error"]
    run_failed, verify_failed = s["problems"]
    assert run_failed.startswith(f"the newest backup run failed at {s['last_run']['at']}: ")
    assert verify_failed.startswith(f"the newest verification ({newest}, ") and "1000000" in verify_failed

    # Another host, with nothing but the configuration (its own empty state_dir), sees the same.
    dr = tmp_path / "dr.toml"
    dr.write_text(config.read_text().replace(str(tmp_path / "state"), str(tmp_path / "dr-state")))
    other = status(dr)
    same = ("backups", "verification", "pins", "pitr", "archive", "state")
    assert {k: other[k] for k in same} == {k: s[k] for k in same}
    assert other["last_run"]["result"] == "failure"  # the failure record lives in the repository too

    text = run_backupd("status", config=dr, check=True).out
    assert text.startswith(f"job shop (sqlite, {tmp_path / 'repo'}): error")
    assert f"PROBLEM: the newest verification ({newest}" in text and "pins          " + first in text

    # Storage that cannot be read: exit 1, the job named.
    shutil.move(tmp_path / "repo", tmp_path / "repo.away")
    (tmp_path / "repo").write_text("not a directory\n")
    result = run_backupd("status", "--json", config=config)
    assert result.code == 1
    [broken] = json.loads(result.out)["jobs"]
    assert broken["state"] == "error" and broken["problems"][0].startswith("cannot read the repository")


def test_status_shows_the_local_daemons_archivers(tmp_path: Path, keys: Keys, start_daemon) -> None:
    port = free_port()
    config = archivers_config(tmp_path, keys, port, shop={"archiver_failures": 10_000})
    d = start_daemon(config, port)
    d.wait_for(lambda: d.health()[0] == 503, what="the archiver down")
    s = status(config, env={"PYTHONPATH": str(PLUGINS)})  # the test driver's entry point
    [archiver] = s["archivers"]
    assert archiver["name"] == "slowlog:shop" and archiver["state"] == "restarting"
    assert any(p.startswith("log archiver slowlog:shop is restarting: DriverError: archiver attempt")
               for p in s["problems"])
    assert s["archive_lag_seconds"] == 0  # declared at 0 for an archiving job; this archiver ships nothing
    assert d.stop() == 0


def test_check_json(tmp_path: Path, keys: Keys) -> None:
    config = sqlite_config(tmp_path, keys, free_port())
    result = run_backupd("check", "--json", config=config)
    report = json.loads(result.out)
    assert result.code == 0 and report["ok"] is True
    names = [c["name"] for c in report["checks"]]
    assert names[0] == "config" and "storage.main" in names and all(set(c) == {"name", "status", "ok", "detail"}
                                                                     for c in report["checks"])

    write_config(tmp_path / "bad.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "db.sqlite3-not-a-dir" / "x")},
        "encryption": {"recipients": [keys.recipient]},
        "jobs.shop": {"driver": "sqlite", "path": str(tmp_path / "missing.sqlite3"), "storage": "main"},
    })
    (tmp_path / "db.sqlite3-not-a-dir").write_text("a file\n")
    result = run_backupd("check", "--json", config=tmp_path / "bad.toml")
    report = json.loads(result.out)
    assert result.code == 1 and report["ok"] is False
    assert any(c["name"] == "storage.main" and c["status"] == "fail" for c in report["checks"])
