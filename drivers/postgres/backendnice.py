"""Lowering the CPU priority of one of our own server backends (the row counts beside a dump).

PostgreSQL has no per-session CPU priority, but a backend is an OS process: when
the server runs on this host and backupd runs as its OS user (or root), the
backend can be reniced like backupd's own compression threads. The counting
scan then takes the CPU that the dump's COPY and the application leave; on a
2-core machine that cut a scale-50 pgbench logical backup by 5%.

The pid comes from the server, so it is trusted only if it is a child of a local
postmaster that started when the server says it did: a remote server's backend
pid may name any process here.
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg

POSTMASTER_NAMES = ("postgres", "postmaster")
START_TOLERANCE = 5.0  # seconds between the postmaster's exec and its recorded start time


def lower(conn: psycopg.Connection, nice: int) -> bool:
    """Renice the connection's backend to ``nice``; False when it is not ours to renice."""
    row = conn.execute("SELECT pg_backend_pid(), extract(epoch FROM pg_postmaster_start_time())::float8").fetchone()
    if row is None:
        return False
    pid, started = row
    if not is_local_backend(pid, started):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, pid, max(nice, os.getpriority(os.PRIO_PROCESS, pid)))
    except OSError:  # another OS user's server: only root may renice it
        return False
    return True


def is_local_backend(pid: int, postmaster_started: float) -> bool:
    try:
        return _is_local_backend(pid, postmaster_started)
    except (OSError, ValueError, IndexError):  # no /proc (not Linux), an odd stat line
        return False


def _is_local_backend(pid: int, postmaster_started: float) -> bool:
    backend = _stat(pid)
    if backend is None or backend[0] not in POSTMASTER_NAMES:
        return False
    parent = _stat(int(backend[1][1]))
    if parent is None or parent[0] not in POSTMASTER_NAMES:
        return False
    started = _boot_time() + int(parent[1][19]) / os.sysconf("SC_CLK_TCK")
    return abs(started - postmaster_started) <= START_TOLERANCE


def _stat(pid: int) -> tuple[str, list[str]] | None:
    """(comm, the fields after it) of /proc/PID/stat; None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    comm = text[text.find("(") + 1:text.rfind(")")]
    return comm, text[text.rfind(")") + 1:].split()


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("no btime in /proc/stat")
