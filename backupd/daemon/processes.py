"""A backstop at shutdown: no child process of the daemon outlives it.

Drivers kill their native tools when a backup is aborted; anything still
running once every run has stopped (a tool that ignored its pipe closing) is
terminated here, then killed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any


def children(pid: int | None = None) -> list[int]:
    """Direct children of ``pid`` (default: this process), from /proc."""
    parent = pid or os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and fields[1].isdigit() and int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def kill_children(log: Any, grace: float = 3.0) -> list[int]:
    pids = children()
    for pid in pids:
        log.warning("terminating a leftover child process", pid=pid, command=_command(pid))
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        _reap()
        pids = [pid for pid in pids if pid in children()]
        time.sleep(0.05)
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    _reap()
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"
