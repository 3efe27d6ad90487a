"""An RDB snapshot over the replication protocol, the way ``redis-cli --rdb`` takes it.

Handshake: ``REPLCONF capa eof`` (we can read a diskless transfer),
``REPLCONF rdb-only 1`` (Redis 7+: no replication stream after the snapshot),
``PSYNC ? -1`` (a full resync: ``+FULLRESYNC <replid> <offset>``). While the
server forks and writes, it sends bare newlines as keepalives; then the payload
arrives either as ``$<len>\\r\\n`` + len bytes (disk-based) or as
``$EOF:<40-byte mark>\\r\\n`` + bytes + the same mark (diskless). Both are
exposed as one ``read()`` stream, never held whole in memory.

The server waits ``repl-diskless-sync-delay`` seconds (default 5) before a
diskless transfer starts; backupd never changes server configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

from backupd.errors import DriverError
from backupd.streamtap import BackgroundParser, TeeReader  # noqa: F401  (TeeReader: re-exported)
from drivers.redis.rdb import RdbFormatError, RdbSummary, parse_stream
from drivers.redis.resp import Connection, RedisReplyError

MARK_LEN = 40
CHUNK = 1 << 20
PARSER_QUEUE = 16


@dataclass
class SyncInfo:
    replication_id: str = ""
    offset: int | None = None
    form: str = ""  # "disk" ($<len>) or "diskless" ($EOF:<mark>)
    announced_size: int | None = None


class RdbTransfer:
    """The payload of a full resync as a readable stream; ``received`` counts its bytes."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.info = SyncInfo()
        self.received = 0
        self._remaining: int | None = None
        self._mark: bytes | None = None
        self._pending = bytearray()
        self._tail: bytes | None = None
        self._done = False

    @classmethod
    def start(cls, conn: Connection) -> "RdbTransfer":
        transfer = cls(conn)
        transfer._handshake()
        return transfer

    def _handshake(self) -> None:
        conn = self.conn
        try:
            conn.command("REPLCONF", "capa", "eof")
        except RedisReplyError as exc:
            raise DriverError(f"{conn.where}: REPLCONF refused: {exc}",
                              hint="the backup user needs the replconf and psync commands (ACL +replconf +psync)") from None
        try:
            conn.command("REPLCONF", "rdb-only", "1")
        except RedisReplyError:
            pass  # before Redis 7.0: the server streams commands after the RDB, which we never read
        conn.send("PSYNC", "?", "-1")
        line = self._next_line()
        if line.startswith(b"-"):
            raise DriverError(f"{conn.where}: PSYNC refused: {line[1:].decode(errors='replace')}",
                              hint="the backup user needs the psync command (ACL +psync)")
        if line.startswith(b"+FULLRESYNC"):
            parts = line.decode(errors="replace").split()
            if len(parts) == 3 and parts[2].isdigit():
                self.info.replication_id, self.info.offset = parts[1], int(parts[2])
            line = self._next_line()
        if line.startswith(b"-"):
            raise DriverError(f"{conn.where}: the server could not produce a snapshot: {line[1:].decode(errors='replace')}")
        if not line.startswith(b"$"):
            raise DriverError(f"{conn.where}: protocol error: expected the RDB payload, got {line[:60]!r}")
        if line.startswith(b"$EOF:"):
            mark = line[5:]
            if len(mark) != MARK_LEN:
                raise DriverError(f"{conn.where}: protocol error: EOF mark of {len(mark)} bytes")
            self._mark = mark
            self.info.form = "diskless"
        else:
            size_text = line[1:]
            if not size_text.isdigit():
                raise DriverError(f"{conn.where}: protocol error: bad payload length {line[:40]!r}")
            self._remaining = int(size_text)
            self.info.form = "disk"
            self.info.announced_size = self._remaining

    def _next_line(self) -> bytes:
        while True:  # empty lines are the server's keepalives while it forks and writes
            line = self.conn.read_line()
            if line:
                return line

    def read(self, size: int = -1) -> bytes:
        if self._done:
            return b""
        limit = CHUNK if size is None or size < 0 else max(1, size)
        data = self._read_sized(limit) if self._mark is None else self._read_marked(limit)
        self.received += len(data)
        return data

    def _read_sized(self, limit: int) -> bytes:
        assert self._remaining is not None
        if self._remaining == 0:
            self._done = True
            return b""
        try:
            data = self.conn.read_some(min(limit, self._remaining))
        except DriverError as exc:
            raise DriverError(f"{exc} after {self.received} of {self.info.announced_size} RDB bytes") from None
        self._remaining -= len(data)
        return data

    def _read_marked(self, limit: int) -> bytes:
        assert self._mark is not None
        while True:
            if self._tail is not None:  # the mark was seen: serve what preceded it, then stop
                if not self._tail:
                    self._done = True
                    return b""
                data, self._tail = self._tail[:limit], self._tail[limit:]
                return data
            if len(self._pending) <= MARK_LEN:
                try:
                    self._pending += self.conn.read_some(CHUNK)
                except DriverError as exc:
                    raise DriverError(f"{exc} after {self.received} RDB bytes, before the end mark") from None
            end = self._pending.find(self._mark)
            if end >= 0:  # whatever follows the mark is replication traffic we do not want
                self._tail = bytes(self._pending[:end])
                self._pending.clear()
                continue
            # Hold back MARK_LEN - 1 bytes: the mark may straddle two receives.
            ready = len(self._pending) - (MARK_LEN - 1)
            if ready > 0:
                take = min(ready, limit)
                data = bytes(self._pending[:take])
                del self._pending[:take]
                return data


def _format_error(exc: Exception) -> Exception:
    return exc if isinstance(exc, RdbFormatError) else RdbFormatError(f"{type(exc).__name__}: {exc}")


class StreamingParser(BackgroundParser[RdbSummary]):
    """Parses an RDB in a helper thread from the chunks a backup streams past it (key counts)."""

    def __init__(self) -> None:
        super().__init__(parse_stream, name="rdb-parser", depth=PARSER_QUEUE, wrap_error=_format_error)
