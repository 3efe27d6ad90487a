"""Stopping the servers and tools drivers start (scratch instances for verification)."""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:  # type: ignore[type-arg]
    """SIGTERM (a clean shutdown), then SIGKILL if it is still running after ``timeout``; always reaped."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
