"""Progress of long foreground commands on a terminal: bytes, rate, ETA when the total is known.

The pipeline calls ``advance(n)`` (and ``expect(n)`` when it knows how much is
coming); both are no-ops unless ``main()`` installed a reporter, which it does
only for backup, restore and verify with stderr on a TTY. Output is one line
redrawn in place at most five times a second, erased at the end.
"""

from __future__ import annotations

import threading
import time
from typing import TextIO

_reporter: "Reporter | None" = None


def advance(count: int) -> None:
    reporter = _reporter
    if reporter is not None and count:
        reporter.advance(count)


def expect(count: int | None) -> None:
    reporter = _reporter
    if reporter is not None and count:
        reporter.expect(count)


def install(reporter: "Reporter | None") -> None:
    global _reporter
    _reporter = reporter


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Reporter:
    def __init__(self, label: str, stream: TextIO, interval: float = 0.2) -> None:
        self.label = label
        self.stream = stream
        self.interval = interval
        self.done = 0
        self.total = 0
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._lock = threading.Lock()
        self._drawn = False

    def expect(self, count: int) -> None:
        with self._lock:
            self.total += count

    def advance(self, count: int) -> None:
        with self._lock:
            self.done += count
            now = time.monotonic()
            if now - self._last_draw >= self.interval:
                self._last_draw = now
                self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self._started, 1e-6)
        rate = self.done / elapsed
        text = f"{self.label}: {human(self.done)}"
        if self.total and self.done <= self.total:
            text += f" of {human(self.total)} ({100 * self.done // self.total}%)"
        text += f", {human(rate)}/s"
        if self.total and self.done <= self.total and rate > 0:
            text += f", ETA {duration((self.total - self.done) / rate)}"
        return text

    def _draw(self, now: float) -> None:
        try:
            self.stream.write("\r\x1b[K" + self.line(now))
            self.stream.flush()
            self._drawn = True
        except (OSError, ValueError):
            pass

    def finish(self) -> None:
        with self._lock:
            if self._drawn:
                try:
                    self.stream.write("\r\x1b[K")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass
