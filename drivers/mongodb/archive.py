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

import struct
from dataclasses import dataclass, field
from typing import Callable

import bson

from backupd.streamtap import BackgroundParser, TeeReader

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


def parse_archive(next_chunk: Callable[[], bytes], on_oplog: Callable[[bytes], object] | None = None
                  ) -> ArchiveSummary:
    """Counts per collection; ``on_oplog`` receives each ``--oplog`` entry's BSON, in order."""
    reader = _Reader(next_chunk)
    summary = ArchiveSummary()
    magic = reader.read(4) if not reader.at_end() else b""
    if len(magic) != 4 or struct.unpack("<I", magic)[0] != MAGIC:
        raise ArchiveFormatError("not a mongodump archive (bad magic number)" if magic else "empty archive")
    summary.header = bson.decode(_document(reader, _int32(reader)))
    while (length := _int32(reader)) != TERMINATOR:  # prelude: collection metadata
        meta = bson.decode(_document(reader, length))
        if meta.get("db") == "" and meta.get("collection") == "oplog":
            continue  # the --oplog entries' own prelude entry: not a collection
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
                if on_oplog is not None:
                    on_oplog(doc)
            else:
                name = f"{db}.{coll}"
                summary.counts[name] = summary.counts.get(name, 0) + 1
    summary.size = reader.consumed
    return summary


def _format_error(exc: Exception) -> Exception:
    if isinstance(exc, ArchiveFormatError):
        return exc
    error = ArchiveFormatError(str(exc))
    error.__cause__ = exc
    return error


class ArchiveCounter(BackgroundParser[ArchiveSummary]):
    """Counts documents per collection in a helper thread while the archive streams to storage."""

    def __init__(self) -> None:
        super().__init__(parse_archive, name="mongo-archive-parser", depth=QUEUE_DEPTH, wrap_error=_format_error)


CountingStream = TeeReader  # a child's stdout, counted and fed to the archive parser as it is read
