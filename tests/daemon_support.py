"""Running ``backupd run`` as a real child process in tests: start, scrape, signal, always kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from s3_server import free_port
from support import BACKUPD, REPO_ROOT

PLUGINS = Path(__file__).resolve().parent / "plugins"


class DaemonProcess:
    def __init__(self, config: Path, port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.port = port
        self.log = log
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS), full_env.get("PYTHONPATH")]))
        self._log_handle = open(log, "ab")
        self.proc = subprocess.Popen([*BACKUPD, "--config", str(config), "--log-format", "json", "run"],
                                     cwd=REPO_ROOT, env=full_env, stdout=self._log_handle,
                                     stderr=subprocess.STDOUT)

    # -- HTTP ---------------------------------------------------------------
    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def health(self) -> tuple[int, dict[str, Any]]:
        status, body = self.get("/healthz")
        return status, json.loads(body)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        status, body = self.get("/metrics")
        assert status == 200
        values = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                values[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return values

    def metric(self, name: str, **labels: str) -> float | None:
        try:
            return self.metrics().get((name, frozenset(labels.items())))
        except (OSError, urllib.error.URLError):
            return None

    # -- waiting --------------------------------------------------------------
    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode} waiting for {what}:\n{self.output()}")
            try:
                value = predicate()
            except (OSError, urllib.error.URLError, ValueError):
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-4000:]}")

    def wait_ready(self) -> None:
        self.wait_for(lambda: self.health()[0] == 200, what="/healthz 200")

    def output(self) -> str:
        self._log_handle.flush()
        return self.log.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    # -- stopping -------------------------------------------------------------
    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_handle.close()


@pytest.fixture
def start_daemon(tmp_path: Path):
    """``start_daemon(config, port, env=None)``; every daemon is killed when the test ends."""
    started: list[DaemonProcess] = []

    def start(config: Path, port: int, env: dict[str, str] | None = None) -> DaemonProcess:
        daemon = DaemonProcess(config, port, tmp_path / f"daemon-{len(started)}.log", env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


__all__ = ["DaemonProcess", "start_daemon", "free_port", "pid_alive"]
