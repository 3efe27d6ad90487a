"""Shared by the benchmarks: let the machine settle before a timed step."""

from __future__ import annotations

import os
import time


def busy_fraction(seconds: float) -> float:
    """Share of the machine's CPU time that was not idle over the next ``seconds``."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:9]]
        return sum(values), values[3] + values[4]
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_idle(timeout: float = 60, sample: float = 1.0, threshold: float = 0.1) -> float:
    """The previous step's writes on disk, then the CPUs idle again; returns the seconds waited."""
    started = time.monotonic()
    os.sync()
    while time.monotonic() - started < timeout and busy_fraction(sample) > threshold:
        pass
    return time.monotonic() - started
