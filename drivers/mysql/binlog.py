"""The binary log file format, as far as archiving and PITR need it.

A binlog file is the 4-byte magic followed by events, each with a 19-byte
header (timestamp, type, server id, size, end position, flags). Walking the
headers tells where the last complete event ends (so a partial copy can be cut
at an event boundary), whether the file was closed (its last event is a Rotate
or a Stop), the time of its events, and where each GTID's transaction lies.
"""

from __future__ import annotations

import re
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

MAGIC = b"\xfebin"
HEADER = struct.Struct("<IBIIIH")
HEADER_SIZE = HEADER.size  # 19
STOP_EVENT = 3
ROTATE_EVENT = 4
FORMAT_DESCRIPTION_EVENT = 15
MYSQL_GTID_EVENT = 33
MARIADB_GTID_EVENT = 162
CLOSING_EVENTS = frozenset({STOP_EVENT, ROTATE_EVENT})
NAME_RE = re.compile(r"^(?P<base>[A-Za-z0-9_.-]+)\.(?P<index>\d{6,})$")
READ_CHUNK = 1 << 20


class BinlogFormatError(ValueError):
    pass


def split_name(name: str) -> tuple[str, int]:
    """``mysql-bin.000042`` -> (``mysql-bin``, 42)."""
    match = NAME_RE.match(name)
    if not match:
        raise BinlogFormatError(f"not a binlog file name: {name!r}")
    return match["base"], int(match["index"])


def file_name(base: str, index: int, width: int = 6) -> str:
    return f"{base}.{index:0{width}d}"


@dataclass(frozen=True)
class Event:
    offset: int
    type: int
    timestamp: int
    server_id: int
    size: int
    gtid: str | None = None

    @property
    def end(self) -> int:
        return self.offset + self.size


def _gtid(event_type: int, server_id: int, body: bytes) -> str | None:
    if event_type == MARIADB_GTID_EVENT and len(body) >= 12:
        seq, domain = struct.unpack_from("<QI", body)
        return f"{domain}-{server_id}-{seq}"
    if event_type == MYSQL_GTID_EVENT and len(body) >= 25:
        return f"{uuid.UUID(bytes=body[1:17])}:{struct.unpack_from('<q', body, 17)[0]}"
    return None


@dataclass
class Scanner:
    """Walks a growing binlog file incrementally; each byte's header is read once."""

    path: Path
    offset: int = 0  # end of the last complete event (0: magic not yet seen)
    last_type: int | None = None
    first_timestamp: int | None = None
    last_timestamp: int | None = None
    events: int = 0
    gtids: list[tuple[str, int]] = field(default_factory=list)  # (gtid, offset of its event)
    keep_gtids: bool = False

    @property
    def closed(self) -> bool:
        return self.last_type in CLOSING_EVENTS

    def scan(self) -> int:
        """Advance over complete events now on disk; return the new offset."""
        with open(self.path, "rb") as handle:
            if self.offset == 0:
                magic = handle.read(4)
                if len(magic) < 4:
                    return 0
                if magic != MAGIC:
                    raise BinlogFormatError(f"{self.path}: not a binlog file (bad magic)")
                self.offset = 4
            handle.seek(self.offset)
            for event in _iter_events(handle, self.offset):
                self._see(event)
        return self.offset

    def _see(self, event: Event) -> None:
        self.offset = event.end
        self.last_type = event.type
        self.events += 1
        if event.timestamp:
            self.first_timestamp = self.first_timestamp or event.timestamp
            self.last_timestamp = max(self.last_timestamp or 0, event.timestamp)
        if self.keep_gtids and event.gtid:
            self.gtids.append((event.gtid, event.offset))


def _iter_events(handle: BinaryIO, offset: int) -> Iterator[Event]:
    """Complete events from ``offset``; stops quietly at a torn tail."""
    buffer = b""
    base = offset  # file offset of buffer[0]
    pos = 0
    while True:
        if len(buffer) - pos < HEADER_SIZE + 32:
            chunk = handle.read(READ_CHUNK)
            buffer = buffer[pos:] + chunk
            base += pos
            pos = 0
            if len(buffer) < HEADER_SIZE:
                return
        timestamp, event_type, server_id, size, _end, _flags = HEADER.unpack_from(buffer, pos)
        if size < HEADER_SIZE:
            raise BinlogFormatError(f"corrupt event header at offset {base + pos} (size {size})")
        if len(buffer) - pos < size:
            # Need the whole event: read more; a torn tail stops the walk.
            need = size - (len(buffer) - pos)
            more = handle.read(max(need, READ_CHUNK))
            if len(more) < need:
                return
            buffer = buffer[pos:] + more
            base += pos
            pos = 0
        gtid = None
        if event_type in (MARIADB_GTID_EVENT, MYSQL_GTID_EVENT):
            gtid = _gtid(event_type, server_id, buffer[pos + HEADER_SIZE:pos + size])
        yield Event(base + pos, event_type, timestamp, server_id, size, gtid)
        pos += size


def event_time(path: Path, offset: int) -> float:
    """When the event at ``offset`` was written (its header's timestamp; the file's mtime when the
    header is not on disk yet or carries none)."""
    with open(path, "rb") as handle:
        handle.seek(max(offset, len(MAGIC)))
        header = handle.read(HEADER_SIZE)
        mtime = path.stat().st_mtime
    if len(header) == HEADER_SIZE:
        timestamp = HEADER.unpack(header)[0]
        if timestamp:
            return float(timestamp)
    return mtime


def iter_events(path: Path) -> Iterator[Event]:
    with open(path, "rb") as handle:
        if handle.read(4) != MAGIC:
            raise BinlogFormatError(f"{path}: not a binlog file (bad magic)")
        yield from _iter_events(handle, 4)


def parse_gtid(text: str) -> tuple[int, int, int]:
    """MariaDB ``domain-server-seq``."""
    parts = text.strip().split("-")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a MariaDB GTID (domain-server-seq, e.g. 0-1-42): {text!r}")
    domain, server, seq = (int(p) for p in parts)
    return domain, server, seq


def gtid_state(text: str | None) -> dict[int, int]:
    """A MariaDB GTID position list (``0-1-42,1-2-7``) as {domain: seq}."""
    state: dict[int, int] = {}
    for item in (text or "").split(","):
        if item.strip():
            domain, _, seq = parse_gtid(item)
            state[domain] = seq
    return state
