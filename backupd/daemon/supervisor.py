"""Log archivers run under the daemon, restarted with backoff when they die.

An archiver's ``run(stop)`` ships logs until ``stop`` is set. Raising or
returning early is a death: it is logged and counted, the archiver is marked
down (``backupd_archiver_up`` 0, ``/healthz`` 503) and restarted after 1 s,
2 s, 4 s ... up to ``daemon.archiver_backoff_max``; a run that lasted a minute
resets the backoff.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import structlog

from backupd.daemon.metrics import ARCHIVER_RESTARTS, ARCHIVER_UP
from backupd.driver import LogArchiver

log = structlog.get_logger(__name__)

HEALTHY_RUN = 60.0  # seconds of running that reset the backoff


@dataclass
class ArchiverStatus:
    job: str
    name: str
    state: str  # starting | running | restarting | stopped
    restarts: int
    last_error: str | None


class Supervised:
    def __init__(self, job: str, archiver: LogArchiver, backoff_max: float, first_delay: float = 1.0) -> None:
        self.job = job
        self.archiver = archiver
        self.name = str(getattr(archiver, "name", type(archiver).__name__))
        self.backoff_max = max(backoff_max, first_delay)
        self.first_delay = first_delay
        self.state = "starting"
        self.restarts = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"archiver-{self.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Ask it to stop; True when it did within ``timeout`` seconds."""
        self._stop.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def status(self) -> ArchiverStatus:
        return ArchiverStatus(self.job, self.name, self.state, self.restarts, self.last_error)

    @property
    def healthy(self) -> bool:
        return self.state in ("starting", "running") and self._thread.is_alive()

    def _loop(self) -> None:
        delay = self.first_delay
        up = ARCHIVER_UP.labels(self.job, self.name)
        with structlog.contextvars.bound_contextvars(job=self.job, archiver=self.name):
            while not self._stop.is_set():
                self.state = "running"
                up.set(1)
                started = time.monotonic()
                log.info("log archiver started")
                try:
                    self.archiver.run(self._stop)
                    if self._stop.is_set():
                        break
                    self.last_error = "run() returned while the daemon was running"
                except Exception as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                if self._stop.is_set():
                    break
                up.set(0)
                self.state = "restarting"
                self.restarts += 1
                ARCHIVER_RESTARTS.labels(self.job, self.name).inc()
                if time.monotonic() - started >= HEALTHY_RUN:
                    delay = self.first_delay
                log.error("log archiver died; restarting", error=self.last_error, retry_in=delay,
                          restarts=self.restarts)
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff_max)
            self.state = "stopped"
            up.set(0)
            log.info("log archiver stopped")
