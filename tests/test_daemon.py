"""``backupd run`` with a SQLite job: scheduling, metrics, health, failures, prune, reload, lock."""

from __future__ import annotations

import datetime as dt
import json
import signal
import socket
from pathlib import Path

from core_fixtures import Keys, make_sample_db
from daemon_support import DaemonProcess, free_port, start_daemon  # noqa: F401 (fixture)
from support import run_backupd, write_config

M_SUCCESS = "backupd_backup_runs_total"
M_LAST = "backupd_backup_last_success_timestamp_seconds"


def daemon_config(tmp_path: Path, keys: Keys, port: int, job: dict | None = None,
                  daemon: dict | None = None, name: str = "shop") -> Path:
    db = tmp_path / "shop.sqlite3"
    if not db.exists():
        make_sample_db(db)
    return write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state"), "metrics_listen": f"127.0.0.1:{port}",
                   "shutdown_timeout": "10s", **(daemon or {})},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        f"jobs.{name}": {"driver": "sqlite", "path": str(db), "storage": "main", **(job or {})},
    })


def runs(d: DaemonProcess, result: str) -> float:
    return d.metric(M_SUCCESS, job="shop", method="logical", type="full", result=result) or 0


def test_scheduled_backups_metrics_health_failures_and_prune(tmp_path: Path, keys: Keys, start_daemon) -> None:
    port = free_port()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(10)
    config = daemon_config(tmp_path, keys, port, {
        "schedule": "@every 2s",
        "retention": {"keep_last": 2},
        "verify": {"schedule": "@every 3s", "checks": ["SELECT count(*) > 0 FROM orders"]},
    })
    d = start_daemon(config, port, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    assert b"READY=1" in notify.recv(4096)
    status, health = d.health()
    assert status == 200 and health["status"] == "ok"
    assert set(health["scheduled"]) == {"backup:shop", "verify:shop", "integrity:shop", "prune:shop"}

    d.wait_for(lambda: runs(d, "success") >= 2, what="two scheduled backups")
    first = d.metric(M_LAST, job="shop", method="logical", type="full")
    d.wait_for(lambda: (d.metric(M_LAST, job="shop", method="logical", type="full") or 0) > first, what="timestamp advancing")
    d.wait_for(lambda: d.metric("backupd_verification_last_result", job="shop") == 1, what="a verification")
    assert list((tmp_path / "repo" / "shop" / "verify").glob("*.json"))

    # prune after each successful backup: keep_last = 2
    d.wait_for(lambda: runs(d, "success") >= 4, what="four backups")
    d.wait_for(lambda: d.metric("backupd_repository_backups", job="shop") == 2, what="pruned to 2")
    manifests = list((tmp_path / "repo" / "shop" / "backups").glob("*/manifest.json"))
    assert 1 <= len(manifests) <= 3  # 2 kept, plus at most one committed since the prune

    # storage goes away: failures are counted, health stays 200 (the daemon itself is fine)
    repo = tmp_path / "repo"
    repo.rename(tmp_path / "repo.away")
    repo.write_text("storage is down\n")
    failures_before = runs(d, "failure")
    d.wait_for(lambda: runs(d, "failure") >= failures_before + 1, what="a failed run")
    d.wait_for(lambda: (d.metric("backupd_job_consecutive_failures", job="shop", task="backup") or 0) >= 1,
               what="consecutive failures")
    assert d.metric("backupd_job_last_result", job="shop", task="backup") == 0
    assert d.metric("backupd_scheduler_events_total", job="shop", task="backup", event="error") >= 1
    stale = d.metric(M_LAST, job="shop", method="logical", type="full")
    assert d.health()[0] == 200

    # storage is back: the next good run resets the state
    repo.unlink()
    (tmp_path / "repo.away").rename(repo)
    d.wait_for(lambda: d.metric("backupd_job_consecutive_failures", job="shop", task="backup") == 0, what="reset")
    assert d.metric("backupd_job_last_result", job="shop", task="backup") == 1
    assert d.metric(M_LAST, job="shop", method="logical", type="full") > stale
    assert list(repo.glob("shop/backups/*/manifest.json"))

    d.signal(signal.SIGTERM)
    assert d.wait_exit(30) == 0
    messages = notify.recv(4096) + b"".join(_drain(notify))
    assert b"STOPPING=1" in messages
    assert not list((tmp_path / "state").glob("control.sock"))

    # audit trail: local JSON lines and objects in the repository
    events = [json.loads(line) for line in (tmp_path / "state" / "audit.log").read_text().splitlines()]
    backups = [e for e in events if e["command"] == "backup"]
    assert {e["result"] for e in backups} == {"success", "failure"}
    assert all(e["trigger"] == "schedule" and e["job"] == "shop" and e["user"] and e["host"] for e in events)
    assert any(e["command"] == "prune" for e in events) and any(e["command"] == "verify" for e in events)
    assert list(repo.glob("shop/audit/*.json"))


def _drain(sock: socket.socket) -> list[bytes]:
    sock.settimeout(0.5)
    out = []
    try:
        while True:
            out.append(sock.recv(4096))
    except (TimeoutError, socket.timeout):
        return out


def test_metrics_come_from_the_repository_after_restart(tmp_path: Path, keys: Keys, start_daemon) -> None:
    port = free_port()
    config = daemon_config(tmp_path, keys, port, {"verify": {"checks": ["SELECT count(*) > 0 FROM orders"]}})
    ids = [run_backupd("backup", "shop", config=config, check=True).out.strip() for _ in range(2)]
    assert run_backupd("verify", "shop", config=config).code == 0
    listed = json.loads(run_backupd("list", "shop", "--json", config=config, check=True).out)["backups"]
    newest = next(b for b in listed if b["backup_id"] == ids[-1])

    d = start_daemon(config, port)  # no schedule at all: nothing runs, metrics still tell the truth
    d.wait_ready()
    d.wait_for(lambda: d.metric("backupd_repository_backups", job="shop") == 2, what="metrics warm-up")
    finished = dt.datetime.fromisoformat(newest["finished_at"].replace("Z", "+00:00")).timestamp()
    assert abs(d.metric(M_LAST, job="shop", method="logical", type="full") - finished) < 1e-3
    assert d.metric("backupd_verification_last_result", job="shop") == 1
    assert d.metric("backupd_verification_last_success_timestamp_seconds", job="shop") > 0
    assert d.metric("backupd_build_info", version="0.1.0") == 1
    assert runs(d, "success") == 0  # filled from storage, not counted as runs
    assert d.stop() == 0


def test_missed_run_runs_once_at_start_within_grace(tmp_path: Path, keys: Keys, start_daemon) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    due = now - dt.timedelta(hours=1)  # a daily run was due an hour ago, while the "host was down"
    schedule = f"{due.minute} {due.hour} * * *"
    state = tmp_path / "state"
    state.mkdir()
    last = (now - dt.timedelta(days=1, hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    (state / "schedule.json").write_text(json.dumps({"last_run": {"backup:shop": last}}))

    port = free_port()
    config = daemon_config(tmp_path, keys, port, {"schedule": schedule})
    d = start_daemon(config, port)
    d.wait_for(lambda: runs(d, "success") == 1, what="the missed run")
    d.wait_for(lambda: "backup:shop" in json.loads((state / "schedule.json").read_text())["last_run"]
               and json.loads((state / "schedule.json").read_text())["last_run"]["backup:shop"] > last,
               what="last run persisted")
    assert d.stop() == 0

    # Past the grace time: counted as missed, not run.
    (state / "schedule.json").write_text(json.dumps({"last_run": {"backup:shop": last}}))
    config = daemon_config(tmp_path, keys, port, {"schedule": schedule}, {"misfire_grace_time": "30m"})
    d = start_daemon(config, port)
    d.wait_ready()
    assert d.metric("backupd_scheduler_events_total", job="shop", task="backup", event="missed") == 1
    assert d.metric("backupd_backup_missed_runs_total", job="shop") == 1
    assert runs(d, "success") == 0
    assert d.stop() == 0


def test_sighup_keeps_old_jobs_on_a_broken_file_and_applies_a_good_one(tmp_path: Path, keys: Keys,
                                                                        start_daemon) -> None:
    port = free_port()
    config = daemon_config(tmp_path, keys, port, {"schedule": "0 3 * * *"})
    good = config.read_text()
    d = start_daemon(config, port)
    d.wait_ready()
    assert "backup:shop" in d.health()[1]["scheduled"]

    config.write_text(good.replace('schedule = "0 3 * * *"', 'schedule = "every day please"'))
    d.signal(signal.SIGHUP)
    d.wait_for(lambda: d.metric("backupd_config_reloads_total", result="failure") == 1, what="failed reload")
    errors = [r for r in d.records() if r.get("event", "").startswith("configuration reload failed")]
    assert errors and any("jobs.shop.schedule" in e for e in errors[0]["errors"])
    status, health = d.health()
    assert status == 200 and "backup:shop" in health["scheduled"]

    daemon_config(tmp_path, keys, port, {"schedule": "@every 1s"}, name="orders")
    d.signal(signal.SIGHUP)
    d.wait_for(lambda: d.metric("backupd_config_reloads_total", result="success") == 1, what="good reload")
    assert "backup:orders" in d.health()[1]["scheduled"] and "backup:shop" not in d.health()[1]["scheduled"]
    d.wait_for(lambda: d.metric(M_SUCCESS, job="orders", method="logical", type="full", result="success"), what="new job runs")
    assert d.stop() == 0


def test_second_daemon_on_the_same_state_dir_exits_2(tmp_path: Path, keys: Keys, start_daemon) -> None:
    port = free_port()
    config = daemon_config(tmp_path, keys, port)
    first = start_daemon(config, port)
    first.wait_ready()
    second = start_daemon(config, free_port())
    assert second.wait_exit(30) == 2
    lines = [line for line in second.output().splitlines() if line.startswith("backupd: error")]
    assert lines == [f"backupd: error: another backupd daemon is already running on state_dir "
                     f"{tmp_path / 'state'} (pid {first.proc.pid})"]
    assert first.health()[0] == 200
    assert first.stop() == 0


def test_bad_config_and_busy_port_fail_clearly(tmp_path: Path, keys: Keys) -> None:
    port = free_port()
    config = daemon_config(tmp_path, keys, port, {"schedule": "61 * * * *"})
    result = run_backupd("run", config=config, timeout=30)
    assert result.code == 2
    assert "jobs.shop.schedule: cron minute: '61' is not in 0-59" in result.err

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        config = daemon_config(tmp_path, keys, port)
        result = run_backupd("run", config=config, timeout=30)
    assert result.code == 1
    assert f"daemon.metrics_listen 127.0.0.1:{port}: cannot listen" in result.err
