"""Log archivers supervised by the daemon, and the control socket dispatching per job."""

from __future__ import annotations

import signal
from pathlib import Path

from backupd.control import request, socket_path
from core_fixtures import Keys
from daemon_support import free_port, start_daemon  # noqa: F401 (fixture)
from support import write_config


def archiver_config(tmp_path: Path, keys: Keys, port: int, failures: int) -> Path:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state"), "metrics_listen": f"127.0.0.1:{port}",
                   "archiver_backoff_max": "1s"},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient]},
        "jobs.slow": {"driver": "slowtest", "workdir": str(workdir), "storage": "main", "archive_logs": True,
                      "archiver_failures": failures},
        "jobs.quiet": {"driver": "slowtest", "workdir": str(workdir), "storage": "main"},
    })


def test_archiver_is_restarted_with_backoff_and_health_follows(tmp_path: Path, keys: Keys, start_daemon) -> None:
    port = free_port()
    config = archiver_config(tmp_path, keys, port, failures=10_000)
    d = start_daemon(config, port)
    labels = {"job": "slow", "archiver": "slowlog:slow"}
    d.wait_for(lambda: (d.metric("backupd_archiver_restarts_total", **labels) or 0) >= 2, what="restarts")
    d.wait_for(lambda: d.health()[0] == 503, what="unhealthy while the archiver is down")
    reasons = d.health()[1]["reasons"]
    assert any("log archiver slowlog:slow of job slow is restarting: DriverError: archiver attempt" in r
               for r in reasons), reasons
    assert d.metric("backupd_archiver_up", **labels) == 0

    # A fixed configuration, reloaded: the archiver runs and health is back.
    archiver_config(tmp_path, keys, port, failures=0)
    d.signal(signal.SIGHUP)
    d.wait_for(lambda: d.health()[0] == 200, what="healthy again")
    d.wait_for(lambda: (tmp_path / "work" / "archiver.heartbeat").exists(), what="archiver heartbeat")
    assert d.metric("backupd_archiver_up", **labels) == 1
    status = d.health()[1]["archivers"]
    assert [(a["name"], a["state"]) for a in status] == [("slowlog:slow", "running")]  # quiet: archive_logs off

    # Control socket: ops are dispatched to the named job's driver.
    sock = socket_path(tmp_path / "state")
    reply = request(sock, {"op": "echo", "job": "quiet", "data": "hello"})
    assert reply == {"ok": True, "job": "quiet", "pid": d.proc.pid, "echo": "hello"}
    assert request(sock, {"op": "echo", "job": "slow"})["job"] == "slow"
    ambiguous = request(sock, {"op": "echo"})
    assert ambiguous["ok"] is False and "needs a job: served by quiet, slow" in ambiguous["error"]
    assert request(sock, {"op": "echo", "job": "nope"})["ok"] is False
    assert request(sock, {"op": "wal-push", "job": "slow"}) == {"ok": False, "error": "unknown op 'wal-push'"}
    status = request(sock, {"op": "status"})
    assert status["ok"] and status["healthy"] and status["pid"] == d.proc.pid

    assert d.stop() == 0
    assert request(sock, {"op": "status"}) is None  # socket removed: clients fall back to doing the work
