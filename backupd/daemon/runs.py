"""Runs in flight: the global parallelism limit, per-run cancel events and timeouts.

The scheduler cannot kill a thread, so every run carries a cancel Event: its
timeout, a shutdown past ``daemon.shutdown_timeout`` or a second signal sets it,
and the pipeline aborts (child processes killed, multipart uploads aborted, no
manifest written).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from backupd.children import Scope, scope as children_scope
from backupd.errors import Aborted


class Slots:
    """A resizable counting semaphore: at most ``daemon.max_parallel_jobs`` runs work at once."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._used = 0
        self._closed = False
        self._cond = threading.Condition()

    def close(self) -> None:
        """Shutting down: runs still waiting for a slot never get one."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def resize(self, size: int) -> None:
        with self._cond:
            self._size = size
            self._cond.notify_all()

    def acquire(self, cancel: threading.Event) -> bool:
        """Wait for a slot; False when ``cancel`` is set or the slots are closed first."""
        with self._cond:
            while self._used >= self._size or self._closed:
                if cancel.is_set() or self._closed:
                    return False
                self._cond.wait(0.2)
            self._used += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._used -= 1
            self._cond.notify_all()

    @property
    def used(self) -> int:
        return self._used


@dataclass
class Run:
    job_id: str  # "backup:orders"
    job: str
    timeout: float | None
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)
    reason: str | None = None  # why it was cancelled: "timeout", "shutdown"
    #: the native tools and scratch servers this run started: aborting kills them, mid-restore included
    children: Scope = field(default_factory=lambda: Scope("run"))
    _timer: threading.Timer | None = None

    def abort(self, reason: str) -> None:
        if not self.cancel.is_set():
            self.reason = reason
            self.cancel.set()
            self.children.cancel()

    def check(self) -> None:
        if self.cancel.is_set():
            raise Aborted(f"{self.job_id} aborted ({self.reason})")


class Runs:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[int, Run] = {}
        self._idle = threading.Condition(self._lock)
        self.stopping = False

    @contextlib.contextmanager
    def start(self, job_id: str, job: str, timeout: float | None) -> Iterator[Run]:
        run = Run(job_id, job, timeout)
        if timeout:
            run._timer = threading.Timer(timeout, run.abort, args=("timeout",))
            run._timer.daemon = True
            run._timer.start()
        with self._lock:
            self._active[id(run)] = run
            if self.stopping:
                run.abort("shutdown")
        try:
            with children_scope(run.children):
                yield run
        finally:
            if run._timer is not None:
                run._timer.cancel()
            with self._lock:
                del self._active[id(run)]
                self._idle.notify_all()

    def active(self) -> list[Run]:
        with self._lock:
            return list(self._active.values())

    def abort_all(self, reason: str) -> None:
        with self._lock:
            for run in self._active.values():
                run.abort(reason)

    def wait_idle(self, timeout: float) -> bool:
        """True when no run is active, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._active:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.5))
            return True
