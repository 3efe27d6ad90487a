"""Parse a stream in a helper thread while it flows past to storage.

Drivers use it to learn what a dump contains (key counts in an RDB, document
counts in a mongodump archive) without holding the dump or slowing it: the
queue is bounded, so memory stays constant, and a parser that fails keeps
draining, so the stream never blocks on it.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, TypeVar

from backupd.storage import Readable

T = TypeVar("T")
NextChunk = Callable[[], bytes]  # returns b"" at the end of the stream


class BackgroundParser(Generic[T]):
    def __init__(self, parse: Callable[[NextChunk], T], *, name: str, depth: int = 16,
                 wrap_error: Callable[[Exception], Exception] = lambda exc: exc) -> None:
        self._parse = parse
        self._wrap_error = wrap_error
        self._queue: queue.Queue[bytes] = queue.Queue(depth)
        self._ended = False
        self.summary: T | None = None
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def feed(self, chunk: bytes) -> None:
        if chunk:
            self._queue.put(chunk)

    def _next(self) -> bytes:
        if self._ended:
            return b""
        chunk = self._queue.get()
        self._ended = not chunk
        return chunk

    def _run(self) -> None:
        try:
            self.summary = self._parse(self._next)
        except Exception as exc:  # format errors and parser bugs alike: report, never hang
            self.error = self._wrap_error(exc)
        while not self._ended:
            self._next()

    def finish(self, timeout: float | None = None) -> T:
        """Signal the end of the stream; return what the parser found or raise its error."""
        self._queue.put(b"")
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        if self.summary is None:
            raise self._wrap_error(RuntimeError("the stream parser did not finish"))
        return self.summary


class TeeReader:
    """Reads from ``source``, counting the bytes and handing every chunk to ``parser``."""

    def __init__(self, source: Readable, parser: BackgroundParser) -> None:  # type: ignore[type-arg]
        self.source = source
        self.parser = parser
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size if size and size > 0 else 1 << 20)
        self.size += len(data)
        self.parser.feed(data)
        return data
