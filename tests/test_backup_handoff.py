"""``backupd backup`` hands the backup to a running daemon of the same configuration, and only then.

The daemon takes it (its log, its metrics, the audit trail naming the command's
user and pid); a changed file, an environment override, a terminal or an odd
command line keep the backup in the command's own process; a failure comes back
with the local run's message and exit status; a command that is killed aborts the
daemon's backup and leaves a repository the next run and ``verify`` accept.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import time
from pathlib import Path

import pytest

from core_fixtures import Keys
from daemon_support import PLUGINS, DaemonProcess, free_port, pid_alive, start_daemon  # noqa: F401 (fixture)
from support import BACKUPD, REPO_ROOT, run_backupd, write_config
from test_daemon import daemon_config

from backupd.cli import backup_handoff

MiB = 1 << 20


def backups_started(d: DaemonProcess) -> list[dict]:
    return [r for r in d.records() if r.get("event") == "backup started"]


def manifests(repo: Path, job: str) -> list[Path]:
    return sorted((repo / job / "backups").glob("*/manifest.json"))


def audit_events(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "audit.log").read_text().splitlines()]


def test_the_running_daemon_takes_the_backup(tmp_path: Path, keys: Keys, start_daemon) -> None:
    port = free_port()
    config = daemon_config(tmp_path, keys, port)
    d = start_daemon(config, port)
    d.wait_ready()

    result = run_backupd("backup", "shop", config=config)
    assert result.code == 0, result.err
    backup_id = result.out.strip()
    assert [m.parent.name for m in manifests(tmp_path / "repo", "shop")] == [backup_id]
    finished = [json.loads(line) for line in result.err.splitlines() if '"backup finished"' in line]
    assert finished and finished[0]["backup_id"] == backup_id and finished[0]["daemon_pid"] == d.proc.pid
    started = backups_started(d)
    assert [(r["backup_id"], r["trigger"]) for r in started] == [(backup_id, "cli")]
    assert d.metric("backupd_backup_runs_total", job="shop", method="logical", type="full", result="success") == 1
    event = audit_events(tmp_path / "state")[-1]
    assert (event["command"], event["backup_id"], event["result"], event["trigger"]) == \
        ("backup", backup_id, "success", "cli")
    assert event["pid"] == started[0]["client_pid"] != d.proc.pid  # the command's pid, from the kernel
    assert event["via"] == f"daemon pid {d.proc.pid}"
    assert run_backupd("verify", "shop", config=config).code == 0


def test_another_configuration_or_an_override_runs_the_backup_locally(tmp_path: Path, keys: Keys,
                                                                     start_daemon) -> None:
    port = free_port()
    config = daemon_config(tmp_path, keys, port)
    d = start_daemon(config, port)
    d.wait_ready()

    overridden = run_backupd("backup", "shop", config=config, env={"BACKUPD_JOBS__SHOP__COMPRESSION": "zstd:9"})
    assert overridden.code == 0, overridden.err
    config.write_text(config.read_text() + "\n# edited after the daemon started\n")
    edited = run_backupd("backup", "shop", config=config)
    assert edited.code == 0, edited.err
    assert backups_started(d) == []  # neither went to the daemon
    for result in (overridden, edited):
        assert '"daemon_pid"' not in result.err and '"backup started"' in result.err
    assert len(manifests(tmp_path / "repo", "shop")) == 2

    d.signal(signal.SIGHUP)  # the daemon loads the edited file: from now on it takes the backups
    d.wait_for(lambda: any(r.get("event") == "configuration reloaded" for r in d.records()), what="the reload")
    assert run_backupd("backup", "shop", config=config).code == 0
    assert len(backups_started(d)) == 1


def test_a_terminal_keeps_the_local_run_and_its_progress_line(tmp_path: Path, keys: Keys, start_daemon) -> None:
    port = free_port()
    config = daemon_config(tmp_path, keys, port)
    d = start_daemon(config, port)
    d.wait_ready()
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([*BACKUPD, "--config", str(config), "--log-format", "json", "backup", "shop"],
                              stdout=subprocess.PIPE, stderr=follower, cwd=REPO_ROOT, timeout=60)
    finally:
        os.close(follower)
        os.close(leader)
    assert proc.returncode == 0
    assert backups_started(d) == []
    assert len(manifests(tmp_path / "repo", "shop")) == 1


def test_a_failure_in_the_daemon_reads_as_the_local_one(tmp_path: Path, keys: Keys, start_daemon) -> None:
    port = free_port()
    config = daemon_config(tmp_path, keys, port)
    d = start_daemon(config, port)
    d.wait_ready()

    usage = run_backupd("backup", "shop", "--method", "physical", config=config)
    assert usage.code == 2
    assert usage.err.strip() == "backupd: error: driver sqlite has no method 'physical' (has: logical)"

    (tmp_path / "shop.sqlite3").unlink()
    failed = run_backupd("backup", "shop", config=config)
    assert failed.code == 1 and failed.err.startswith("backupd: error: ")
    assert "shop.sqlite3" in failed.err
    assert len(backups_started(d)) == 1 and manifests(tmp_path / "repo", "shop") == []
    assert audit_events(tmp_path / "state")[-1]["result"] == "failure"


def test_killing_the_command_aborts_the_daemons_backup(tmp_path: Path, keys: Keys, start_daemon) -> None:
    port = free_port()
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state"), "metrics_listen": f"127.0.0.1:{port}",
                   "shutdown_timeout": "10s"},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.slow": {"driver": "slowtest", "workdir": str(workdir), "size": 400 * MiB, "rate": 4 * MiB,
                      "storage": "main"},
    })
    d = start_daemon(config, port)
    d.wait_ready()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))}
    command = subprocess.Popen([*BACKUPD, "--config", str(config), "--log-format", "json", "backup", "slow"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT, env=env)
    try:
        d.wait_for(lambda: (workdir / "child.pid").exists() and backups_started(d), what="the daemon's backup")
        child = int((workdir / "child.pid").read_text())
        time.sleep(0.5)
        command.kill()
        command.wait(10)
    finally:
        if command.poll() is None:
            command.kill()
        command.communicate()
    d.wait_for(lambda: not pid_alive(child), timeout=20, what="the dump child killed")
    d.wait_for(lambda: any(r.get("event") == "backup failed; removing its objects" for r in d.records()),
               what="the aborted backup cleaned up")
    assert manifests(tmp_path / "repo", "slow") == []
    assert not list((tmp_path / "repo" / "slow" / "backups").glob("*/*")), "aborted backup's objects left"
    d.wait_for(lambda: (tmp_path / "state" / "audit.log").exists()  # written after the clean-up
               and "went away" in audit_events(tmp_path / "state")[-1].get("detail", ""), what="the audit record")
    assert d.health()[0] == 200 and d.health()[1]["running"] == []

    config.write_text(config.read_text().replace(f"size = {400 * MiB}", f"size = {MiB}"))
    d.signal(signal.SIGHUP)
    d.wait_for(lambda: any(r.get("event") == "configuration reloaded" for r in d.records()), what="the reload")
    again = subprocess.run([*BACKUPD, "--config", str(config), "--log-format", "json", "backup", "slow"],
                           capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=60)
    assert again.returncode == 0, again.stderr
    assert [m.parent.name for m in manifests(tmp_path / "repo", "slow")] == [again.stdout.strip()]
    assert run_backupd("verify", "slow", "--integrity-only", config=config, env=env).code == 0


@pytest.mark.parametrize("argv, request_", [
    (["backup", "shop"], {"job": "shop"}),
    (["--config", "/c.toml", "--log-format=console", "backup", "--method", "physical", "shop", "--wait=5"],
     {"job": "shop", "method": "physical", "wait": 5.0}),
])
def test_command_lines_it_hands_over(argv: list[str], request_: dict) -> None:
    assert backup_handoff.parse(argv)["request"] == request_


@pytest.mark.parametrize("argv", [
    ["backup"], ["backup", "a", "b"], ["backup", "shop", "--help"], ["backup", "shop", "--wait", "soon"],
    ["--log-level", "loud", "backup", "shop"], ["list", "shop"], ["backup", "shop", "--method"],
])
def test_command_lines_it_leaves_to_the_full_command(argv: list[str]) -> None:
    assert backup_handoff.parse(argv) is None
