"""The life of one scratch server: start it in its sandbox, wait until it is ready, stop it, always.

Every driver's throwaway instance (PostgreSQL for verification and the PITR
drill, mariadbd, redis-server, mongod) runs through ``ScratchServer``: the
server is the foreground child (no daemonizing wrapper such as ``pg_ctl``), so
its whole life is one registered child process. ``stop()`` asks it to shut
down with its own signal, then kills it (and, through bubblewrap, everything
it started); leaving the ``with`` block always stops it.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from backupd import children
from backupd.errors import DriverError
from backupd.sandbox import Sandbox
from backupd.tool import DEVNULL, Tool, describe_status

POLL = 0.05
#: Processes between backupd and the server: they do not pass signals on, so ``stop`` signals the server itself.
WRAPPERS = frozenset({"runuser", "bwrap"})


class ScratchFailed(DriverError):
    """The scratch server exited or never became ready; the message carries its log's tail."""


class ScratchServer:
    """``argv`` run in ``sandbox``; ready once ``ready()`` returns true.

    ``log`` is the server's log file (its tail goes into errors); ``stop_signal``
    is the server's clean-shutdown signal (PostgreSQL: SIGINT, a fast shutdown).
    """

    def __init__(self, name: str, argv: Sequence[str], sandbox: Sandbox, *, ready: Callable[[], bool],
                 log: Path | None = None, env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 stop_signal: int = signal.SIGTERM, log_filter: Callable[[list[str]], list[str]] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.sandbox = sandbox
        self.ready = ready
        self.log = log
        self.env = env
        self.cwd = cwd
        self.stop_signal = stop_signal
        self.log_filter = log_filter
        self.tool: Tool | None = None

    @property
    def running(self) -> bool:
        return self.tool is not None and self.tool.poll() is None

    def start(self, timeout: float = 120.0) -> None:
        """Start and wait until ready; ScratchFailed (server stopped) if it exits or is not ready in time."""
        self.tool = Tool(self.argv, sandbox=self.sandbox, env=self.env, cwd=self.cwd, stdout=DEVNULL, name=self.name)
        deadline = time.monotonic() + timeout
        while True:
            code = self.tool.poll()
            if code is not None:
                self.tool.wait()
                raise ScratchFailed(f"scratch {self.name} {describe_status(code)} at start: {self.log_tail()}")
            if self.ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ScratchFailed(f"scratch {self.name} was not ready within {timeout:.0f} s: {self.log_tail()}")
            time.sleep(POLL)

    def exited(self) -> int | None:
        """The exit status once the server has stopped on its own, else None."""
        return None if self.tool is None else self.tool.poll()

    def stop(self, timeout: float = 60.0) -> None:
        """Clean shutdown with ``stop_signal``, killed after ``timeout``; idempotent."""
        tool, self.tool = self.tool, None
        if tool is None:
            return
        try:
            if tool.poll() is None:
                server = self.server_pid(tool.pid)
                if server is not None:
                    children._signal(server, self.stop_signal)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    tool.proc.wait(timeout)
        finally:
            tool.close()

    def kill(self) -> None:
        tool, self.tool = self.tool, None
        if tool is not None:
            tool.close()

    @staticmethod
    def server_pid(pid: int) -> int | None:
        """The server below the runuser/bwrap wrappers started as ``pid``."""
        current: int | None = pid
        for _ in range(6):
            if current is None or children.command_name(current) not in WRAPPERS:
                return current
            below = children.child_pids(current)
            current = below[0] if below else None
        return current

    def log_tail(self, lines: int = 5) -> str:
        if self.log is None:
            return self.tool.stderr_summary() if self.tool else "(no log)"
        try:
            text = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return self.tool.stderr_summary() if self.tool else "(no log)"
        if self.log_filter is not None:
            text = self.log_filter(text) or text
        return " | ".join(text[-lines:]) or "(empty log)"

    def __enter__(self) -> "ScratchServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
