"""A scheduled verification past its timeout is cancelled mid-restore: its native tools and scratch servers
are killed through the child registry, and the run is reported aborted."""

from __future__ import annotations

import os
import time
from pathlib import Path

from core_fixtures import Keys
from daemon_support import PLUGINS, free_port, start_daemon  # noqa: F401 (fixture)
from support import run_backupd, write_config


def test_a_verification_past_its_timeout_is_killed_mid_restore(tmp_path: Path, keys: Keys, start_daemon) -> None:
    port = free_port()
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state"), "metrics_listen": f"127.0.0.1:{port}",
                   "shutdown_timeout": "10s"},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.slow": {"driver": "slowtest", "workdir": str(workdir), "storage": "main", "verify_seconds": 300,
                      "verify": {"schedule": "@every 2s", "timeout": "3s"}},
    })
    env = {"PYTHONPATH": str(PLUGINS)}
    assert run_backupd("backup", "slow", config=config, env=env).code == 0
    d = start_daemon(config, port)
    pid_file = workdir / "verify.pid"
    d.wait_for(lambda: pid_file.exists() or None, what="the scratch restore started", timeout=30)
    child = int(pid_file.read_text())
    started = time.monotonic()
    d.wait_for(lambda: not _alive(child) or None, what="the scratch restore killed at the timeout", timeout=30)
    assert time.monotonic() - started < 20  # the 300 s tool did not run on
    d.wait_for(lambda: any(r.get("event") == "scheduled run failed" and "timed out" in str(r.get("error", ""))
                           for r in d.records()) or None, what="the run reported as timed out", timeout=30)
    assert d.stop() == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead: it only waits to be reaped
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
