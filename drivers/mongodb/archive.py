"""Counting documents per collection in a ``mongodump --archive`` stream as it passes.

The archive (mongo-tools ``common/archive``): a magic number (0x8199e26d,
little-endian), a header BSON document, a prelude of one metadata document per
collection ended by a -1 terminator, then blocks: a namespace header document
``{db, collection, EOF, CRC}``, that namespace's documents, and a -1
terminator. ``--oplog`` entries travel under the namespace ``{db: "", collection:
"oplog"}``. The parser reads BSON lengths and skips document bodies, so the
counts describe exactly the dump that was stored.
"""

from __future__ import annotations

import queue
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable

import bson

MAGIC = 0x8199E26D
TERMINATOR = -1
QUEUE_DEPTH = 16


class ArchiveFormatError(Exception):
    """The stream is not a mongodump archive, or it is truncated."""


@dataclass
class ArchiveSummary:
    header: dict = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # "db.collection" -> documents
    oplog_entries: int = 0
    last_oplog_ts: bson.Timestamp | None = None
    size: int = 0


class _Reader:
    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        self._next = next_chunk
        self._buf = bytearray()
        self.consumed = 0
        self._eof = False

    def _fill(self, size: int) -> bool:
        while len(self._buf) < size and not self._eof:
            chunk = self._next()
            if not chunk:
                self._eof = True
            self._buf += chunk
        return len(self._buf) >= size

    def read(self, size: int) -> bytes:
        if not self._fill(size):
            raise ArchiveFormatError(f"archive truncated after {self.consumed + len(self._buf)} bytes")
        data = bytes(self._buf[:size])
        del self._buf[:size]
        self.consumed += size
        return data

    def at_end(self) -> bool:
        return not self._fill(1)


def _int32(reader: _Reader) -> int:
    return struct.unpack("<i", reader.read(4))[0]


def _document(reader: _Reader, length: int) -> bytes:
    if length < 5:
        raise ArchiveFormatError(f"bad BSON document length {length} at byte {reader.consumed - 4}")
    return struct.pack("<i", length) + reader.read(length - 4)


def parse_archive(next_chunk: Callable[[], bytes]) -> ArchiveSummary:
    reader = _Reader(next_chunk)
    summary = ArchiveSummary()
    magic = reader.read(4) if not reader.at_end() else b""
    if len(magic) != 4 or struct.unpack("<I", magic)[0] != MAGIC:
        raise ArchiveFormatError("not a mongodump archive (bad magic number)" if magic else "empty archive")
    summary.header = bson.decode(_document(reader, _int32(reader)))
    while (length := _int32(reader)) != TERMINATOR:  # prelude: collection metadata
        meta = bson.decode(_document(reader, length))
        if meta.get("collection") and meta.get("db") is not None:
            summary.counts.setdefault(f"{meta['db']}.{meta['collection']}", 0)
    while not reader.at_end():
        length = _int32(reader)
        if length == TERMINATOR:
            continue
        header = bson.decode(_document(reader, length))
        db, coll = header.get("db", ""), header.get("collection", "")
        oplog = db == "" and coll == "oplog"
        while (length := _int32(reader)) != TERMINATOR:
            doc = _document(reader, length)
            if oplog:
                summary.oplog_entries += 1
                ts = bson.decode(doc).get("ts")
                if isinstance(ts, bson.Timestamp):
                    summary.last_oplog_ts = ts
            else:
                name = f"{db}.{coll}"
                summary.counts[name] = summary.counts.get(name, 0) + 1
    summary.size = reader.consumed
    return summary


class ArchiveCounter:
    """Parses in a helper thread from chunks fed to it (bounded queue); never blocks the stream."""

    def __init__(self) -> None:
        self._queue: queue.Queue[bytes] = queue.Queue(QUEUE_DEPTH)
        self._ended = False
        self.summary: ArchiveSummary | None = None
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="mongo-archive-parser", daemon=True)
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
            self.summary = parse_archive(self._next)
        except Exception as exc:  # format errors and parser bugs alike: report, never hang
            self.error = exc
        while not self._ended:
            self._next()

    def finish(self) -> ArchiveSummary:
        self._queue.put(b"")
        self._thread.join()
        if self.error is not None:
            raise ArchiveFormatError(str(self.error)) from self.error
        assert self.summary is not None
        return self.summary


class CountingStream:
    """A child's stdout, counted and fed to the archive parser as it is read."""

    def __init__(self, stream, counter: ArchiveCounter) -> None:  # type: ignore[no-untyped-def]
        self._stream = stream
        self._counter = counter
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size if size and size > 0 else 1 << 20)
        self.size += len(data)
        self._counter.feed(data)
        return data
