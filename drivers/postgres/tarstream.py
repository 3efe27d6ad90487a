"""A tar stream of chosen chunks of live files, read lazily (one chunk in memory), with each chunk's checksum.

A member holds a whole file, or for a block-incremental copy the file's changed chunks one after the
other (its name then ends in ``.blocks``; the manifest's file map says which chunks). A file that
shrinks while it is read is padded with zeros, as pg_basebackup does: WAL replay rewrites what
changed during the backup. One that vanished is reported so the map leaves it out.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from drivers.postgres.filemap import CHUNK, chunk_hash, chunk_length

BLOCK = 512


@dataclass
class Member:
    name: str
    source: Path
    file_size: int
    mtime_ns: int
    chunks: list[int]  #: which chunks of the file, in order
    hashes: list[str] = field(default_factory=list)  #: filled while streaming: one per chunk stored
    vanished: bool = False
    content: bytes | None = None  #: what to store instead of reading ``source`` (pg_control, backup_label)

    @property
    def data_size(self) -> int:
        return sum(chunk_length(self.file_size, index) for index in self.chunks)


def header(name: str, size: int, mtime_ns: int, mode: int = 0o600) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime_ns // 1_000_000_000, mode
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")


class TarStream:
    """``read()`` gives the tar bytes; after EOF each member's ``hashes`` holds the checksums of what was stored."""

    def __init__(self, members: list[Member]) -> None:
        self.members = members
        self._pieces = self._generate()
        self._rest = b""
        self.size = 0

    def _generate(self) -> Iterator[bytes]:
        for member in self.members:
            size = member.data_size
            yield header(member.name, size, member.mtime_ns)
            yield from self._data(member)
            yield b"\0" * (-size % BLOCK)
        yield b"\0" * (2 * BLOCK)

    def _data(self, member: Member) -> Iterator[bytes]:
        try:
            handle: Any = io.BytesIO(member.content) if member.content is not None else open(member.source, "rb",
                                                                                           buffering=0)
        except FileNotFoundError:
            handle = None
            member.vanished = True
        position = 0
        try:
            for index in member.chunks:
                want = chunk_length(member.file_size, index)
                data = b""
                if handle is not None:
                    if position != index * CHUNK:
                        handle.seek(index * CHUNK)
                    position = index * CHUNK + want
                    data = handle.read(want) or b""
                    while len(data) < want and (more := handle.read(want - len(data))):
                        data += more
                if len(data) < want:
                    data += b"\0" * (want - len(data))
                member.hashes.append(chunk_hash(data))
                yield data
        finally:
            if handle is not None:
                handle.close()

    def read(self, size: int = -1) -> bytes:
        want = size if size is not None and size >= 0 else 1 << 62
        parts = [self._rest] if self._rest else []
        have = len(self._rest)
        self._rest = b""
        while have < want:
            piece = next(self._pieces, None)
            if piece is None:
                break
            parts.append(piece)
            have += len(piece)
        if have > want:  # keep the tail of the last piece for the next read
            cut = len(parts[-1]) - (have - want)
            parts[-1], self._rest = parts[-1][:cut], parts[-1][cut:]
        out = b"".join(parts)
        self.size += len(out)
        return out
