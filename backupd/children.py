"""Every child process backupd starts, in one registry: cancellation and shutdown kill from it.

``backupd.tool`` and ``backupd.scratch`` register each child they start and
unregister it when it is reaped. A run (a scheduled backup or verification)
opens a ``Scope``; children started inside it, in its thread, belong to it, so
aborting the run kills exactly its children, mid-restore included. At shutdown
the daemon kills whatever is still registered.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

Popen = subprocess.Popen  # type: ignore[type-arg]


class Scope:
    """The children of one run; ``cancel()`` kills them and any started afterwards."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cancelled = False
        self._procs: dict[int, Popen] = {}
        self._lock = threading.Lock()

    def _add(self, proc: Popen) -> None:
        with self._lock:
            self._procs[proc.pid] = proc
            cancelled = self.cancelled
        if cancelled:
            kill_tree(proc)

    def _remove(self, proc: Popen) -> None:
        with self._lock:
            self._procs.pop(proc.pid, None)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            procs = list(self._procs.values())
        for proc in procs:
            kill_tree(proc)


_current: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("backupd_children_scope", default=None)
_live: dict[int, tuple[Popen, str, Scope | None]] = {}
_lock = threading.Lock()


@contextlib.contextmanager
def scope(owner: Scope) -> Iterator[Scope]:
    """Children started in this thread inside the block belong to ``owner``."""
    token = _current.set(owner)
    try:
        yield owner
    finally:
        _current.reset(token)


def register(proc: Popen, name: str) -> None:
    owner = _current.get()
    with _lock:
        _live[proc.pid] = (proc, name, owner)
    if owner is not None:
        owner._add(proc)


def unregister(proc: Popen) -> None:
    with _lock:
        entry = _live.pop(proc.pid, None)
    if entry is not None and entry[2] is not None:
        entry[2]._remove(proc)


def live() -> list[tuple[int, str]]:
    """(pid, tool name) of every registered child still running."""
    with _lock:
        return [(pid, name) for pid, (proc, name, _) in _live.items() if proc.poll() is None]


def kill_all(grace: float = 3.0) -> list[tuple[int, str]]:
    """SIGTERM every registered child, SIGKILL what is left after ``grace``; return what was running."""
    with _lock:
        entries = [(proc, name) for proc, name, _ in _live.values() if proc.poll() is None]
    for proc, _ in entries:
        _signal(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc, _ in entries:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_tree(proc)
    return [(proc.pid, name) for proc, name in entries]


def kill_tree(proc: Popen) -> None:
    """SIGKILL ``proc`` and its descendants (runuser does not pass SIGKILL on) and reap it."""
    if proc.poll() is None:
        for pid in [proc.pid, *descendants(proc.pid)]:
            _signal(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live process, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and fields[1].isdigit() and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    return parents


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    return sorted(child for child, parent in _parents().items() if parent == pid)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before their children."""
    parents = _parents()
    found, frontier = [], [pid]
    while frontier:
        frontier = sorted(child for child, parent in parents.items() if parent in frontier)
        found.extend(frontier)
    return found


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
