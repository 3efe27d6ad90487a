"""Log archivers run under the daemon, restarted with backoff when they die.

An archiver's ``run(stop)`` ships logs until ``stop`` is set. Raising or
returning early is a death: it is logged and counted, the archiver is marked
down (``backupd_archiver_up`` 0, ``/healthz`` 503) and restarted after 1 s,
2 s, 4 s ... up to ``daemon.archiver_backoff_max``; a run that lasted a minute
resets the backoff. A restarted archiver counts as up only once it has stayed
up for ``settle`` seconds, so one that dies at every start (its database is
down) stays down between its attempts. An archiver that retries its source
itself (``ReconnectingArchiver``: mysqlbinlog reconnecting) is down while its
source fails, with the source's error as the reason.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import structlog

from backupd.daemon.metrics import ARCHIVER_RESTARTS, ARCHIVER_UP, forget_archiver
from backupd.driver import LogArchiver, ReconnectingArchiver

log = structlog.get_logger(__name__)

HEALTHY_RUN = 60.0  # seconds of running that reset the backoff
SETTLE = 10.0  # seconds a restarted archiver must stay up before it counts as up again


@dataclass
class ArchiverStatus:
    job: str
    name: str
    state: str  # starting | running | retrying | restarting | stopped
    restarts: int
    last_error: str | None


class Supervised:
    def __init__(self, job: str, archiver: LogArchiver, backoff_max: float, first_delay: float = 1.0,
                 settle: float = SETTLE) -> None:
        self.job = job
        self.archiver = archiver
        self.name = str(getattr(archiver, "name", type(archiver).__name__))
        self.backoff_max = max(backoff_max, first_delay)
        self.first_delay = first_delay
        self.settle = settle
        self.restarts = 0
        self.last_error: str | None = None
        self._phase = "starting"  # starting | running | restarting | stopped
        self._run_started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"archiver-{self.name}", daemon=True)

    def start(self) -> None:
        """Run it; its series (up is read at each scrape) replace those of any archiver it replaces."""
        ARCHIVER_RESTARTS.labels(self.job, self.name)
        ARCHIVER_UP.labels(self.job, self.name).set_function(lambda: 1.0 if self.healthy else 0.0)
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Ask it to stop; True when it did within ``timeout`` seconds."""
        self._stop.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def forget(self) -> None:
        """Drop its series (the job is gone or its archiver was replaced)."""
        forget_archiver(self.job, self.name)

    @property
    def state(self) -> str:
        phase = self._phase
        if phase != "running":
            return phase
        if self.restarts and time.monotonic() - self._run_started < self.settle:
            return "restarting"  # relaunched, not yet proven: a crash loop stays down
        if self._source_error() is not None:
            return "retrying"
        return "running"

    def _source_error(self) -> str | None:
        if isinstance(self.archiver, ReconnectingArchiver):
            return self.archiver.source_error()
        return None

    def status(self) -> ArchiverStatus:
        state = self.state
        error = self._source_error() if state == "retrying" else self.last_error
        return ArchiverStatus(self.job, self.name, state, self.restarts, error)

    @property
    def healthy(self) -> bool:
        return self.state in ("starting", "running") and self._thread.is_alive()

    def _loop(self) -> None:
        delay = self.first_delay
        with structlog.contextvars.bound_contextvars(job=self.job, archiver=self.name):
            while not self._stop.is_set():
                self._run_started = time.monotonic()
                self._phase = "running"
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
                self._phase = "restarting"
                self.restarts += 1
                ARCHIVER_RESTARTS.labels(self.job, self.name).inc()
                if time.monotonic() - self._run_started >= HEALTHY_RUN:
                    delay = self.first_delay
                log.error("log archiver died; restarting", error=self.last_error, retry_in=delay,
                          restarts=self.restarts)
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff_max)
            self._phase = "stopped"
            log.info("log archiver stopped")
