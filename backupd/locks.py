"""One lock per job across processes: the daemon's run and a manual backup share it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Iterator

from backupd.errors import Aborted, LockHeld, naming


@contextlib.contextmanager
def job_lock(state_dir: Path, job: str, *, wait: float = 0.0,
             cancel: threading.Event | None = None) -> Iterator[None]:
    """Hold ``state_dir/locks/<job>.lock`` (flock); wait up to ``wait`` seconds for it (Aborted once
    ``cancel`` is set meanwhile)."""
    lock_dir = state_dir / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{job}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _holder(fd)
                    raise LockHeld(
                        f"job {job} is already running{holder} (lock {path})",
                        hint="wait for it to finish, or pass --wait SECONDS",
                    ) from None
                if cancel is not None and cancel.wait(0.2):
                    raise Aborted(f"job {job}: aborted while waiting for its lock (lock {path})")
                if cancel is None:
                    time.sleep(0.2)
        with naming(path):  # "No space left on device" alone says not where
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" in process {pid}" if pid.isdigit() else ""


def lock_free(state_dir: Path, job: str) -> bool:
    """Whether no process holds the job's lock right now (a look, not a hold)."""
    try:
        with job_lock(state_dir, job):
            return True
    except LockHeld:
        return False
