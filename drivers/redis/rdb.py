"""Reading an RDB stream's structure: header, aux fields, databases, keys per database.

The parser skips values instead of decoding them: it knows the size of every
encoding Redis 2.6 to 7.4 writes (RDB versions up to 12), so it can count the
keys of each database while the bytes stream past, and it proves the stream
ends exactly where the RDB says it does (EOF opcode, then the 8-byte checksum).
Keys with an expiry are counted like any other: they are in the snapshot.

The bytes may be hostile (a repository writer, a corrupted disk): nothing the
file says sizes what is kept in memory. Aux fields are kept up to
``MAX_AUX_VALUE`` bytes each and ``MAX_AUX_FIELDS`` in all (longer ones are
skipped, never read whole), database numbers above ``MAX_DATABASE`` are refused,
and a length that runs past the end of the data is "truncated", not a huge read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

MAX_VERSION = 12
#: Aux fields (redis-ver, ctime, ...) are a few bytes; longer values are skipped, not kept.
MAX_AUX_VALUE = 1024
MAX_AUX_FIELDS = 64
#: The highest database number read (Redis defaults to 16 databases; its scratch server gets at most 16384).
MAX_DATABASE = 16383

# Value types (rdb.h RDB_TYPE_*).
STRING, LIST, SET, ZSET, HASH, ZSET_2, MODULE_PRE_GA, MODULE_2 = range(8)
HASH_ZIPMAP, LIST_ZIPLIST, SET_INTSET, ZSET_ZIPLIST, HASH_ZIPLIST = 9, 10, 11, 12, 13
LIST_QUICKLIST, STREAM_LISTPACKS, HASH_LISTPACK, ZSET_LISTPACK = 14, 15, 16, 17
LIST_QUICKLIST_2, STREAM_LISTPACKS_2, SET_LISTPACK, STREAM_LISTPACKS_3 = 18, 19, 20, 21
HASH_METADATA_PRE_GA, HASH_LISTPACK_EX_PRE_GA, HASH_METADATA, HASH_LISTPACK_EX = 22, 23, 24, 25

# Opcodes (rdb.h RDB_OPCODE_*).
OP_SLOT_INFO, OP_FUNCTION2, OP_FUNCTION_PRE_GA, OP_MODULE_AUX = 0xF4, 0xF5, 0xF6, 0xF7
OP_IDLE, OP_FREQ, OP_AUX, OP_RESIZEDB = 0xF8, 0xF9, 0xFA, 0xFB
OP_EXPIRETIME_MS, OP_EXPIRETIME, OP_SELECTDB, OP_EOF = 0xFC, 0xFD, 0xFE, 0xFF

ENC_INT8, ENC_INT16, ENC_INT32, ENC_LZF = 0, 1, 2, 3
_INT_ENCODINGS = {ENC_INT8: (1, "b"), ENC_INT16: (2, "<h"), ENC_INT32: (4, "<i")}
MODULE_OP_EOF, MODULE_OP_SINT, MODULE_OP_UINT, MODULE_OP_FLOAT, MODULE_OP_DOUBLE, MODULE_OP_STRING = range(6)

_SINGLE_STRING_TYPES = frozenset({HASH_ZIPMAP, LIST_ZIPLIST, SET_INTSET, ZSET_ZIPLIST, HASH_ZIPLIST,
                                  HASH_LISTPACK, ZSET_LISTPACK, SET_LISTPACK})
_STREAM_TYPES = frozenset({STREAM_LISTPACKS, STREAM_LISTPACKS_2, STREAM_LISTPACKS_3})


class RdbFormatError(Exception):
    """The bytes are not a well-formed RDB: corrupt or truncated."""


class RdbUnsupported(RdbFormatError):
    """A well-formed RDB may hold this, but this parser does not know it (a newer or pre-GA Redis)."""


@dataclass
class RdbSummary:
    version: int = 0
    aux: dict[str, str] = field(default_factory=dict)
    keys: dict[int, int] = field(default_factory=dict)  # db number -> keys
    expires: dict[int, int] = field(default_factory=dict)  # db number -> keys with a TTL
    functions: int = 0
    checksum: str = ""  # hex of the trailing CRC64 as stored (0 when the writer had rdbchecksum off)
    size: int = 0  # bytes parsed, header to checksum
    complete: bool = True  # False: the parser met something it does not know (RdbUnsupported) and stopped

    def key_counts(self) -> dict[str, int]:
        """``{"db0": 12, ...}``: the names INFO keyspace uses."""
        return {f"db{db}": count for db, count in sorted(self.keys.items())}


class ByteSource:
    """Exact reads over a function returning chunks (b"" at the end)."""

    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        self._next = next_chunk
        self._chunk = b""
        self._pos = 0
        self.consumed = 0

    def _refill(self) -> None:
        chunk = self._next()
        if not chunk:
            raise RdbFormatError(f"RDB truncated after {self.consumed} bytes")
        self._chunk, self._pos = chunk, 0

    def read(self, size: int) -> bytes:
        if self._pos + size <= len(self._chunk):
            data = self._chunk[self._pos:self._pos + size]
            self._pos += size
            self.consumed += size
            return data
        parts = []
        need = size
        while need:
            if self._pos >= len(self._chunk):
                self._refill()
            take = min(need, len(self._chunk) - self._pos)
            parts.append(self._chunk[self._pos:self._pos + take])
            self._pos += take
            need -= take
        self.consumed += size
        return b"".join(parts)

    def skip(self, size: int) -> None:
        need = size
        while need:
            if self._pos >= len(self._chunk):
                self._refill()
            take = min(need, len(self._chunk) - self._pos)
            self._pos += take
            need -= take
        self.consumed += size

    def byte(self) -> int:
        if self._pos >= len(self._chunk):
            self._refill()
        value = self._chunk[self._pos]
        self._pos += 1
        self.consumed += 1
        return value

    def at_end(self) -> bool:
        """True when no bytes are left (reads ahead one chunk if needed)."""
        if self._pos < len(self._chunk):
            return False
        chunk = self._next()
        if not chunk:
            return True
        self._chunk, self._pos = chunk, 0
        return False


class RdbParser:
    def __init__(self, source: ByteSource) -> None:
        self.src = source

    # ---- primitives -----------------------------------------------------------------

    def length(self) -> tuple[int, bool]:
        """(value, is_encoded) as rdbLoadLenByRef reads it."""
        first = self.src.byte()
        kind = first >> 6
        if kind == 0:
            return first & 0x3F, False
        if kind == 1:
            return ((first & 0x3F) << 8) | self.src.byte(), False
        if kind == 3:
            return first & 0x3F, True
        if first == 0x80:
            return struct.unpack(">I", self.src.read(4))[0], False
        if first == 0x81:
            return struct.unpack(">Q", self.src.read(8))[0], False
        raise RdbFormatError(f"unknown length encoding 0x{first:02x} at byte {self.src.consumed - 1}")

    def count(self) -> int:
        value, encoded = self.length()
        if encoded:
            raise RdbFormatError(f"expected a length, found an encoded value at byte {self.src.consumed - 1}")
        return value

    def string(self, keep: int = 0) -> bytes | None:
        """Skip a string; with ``keep`` > 0, return it if it is at most ``keep`` bytes (else skip it, None)."""
        value, encoded = self.length()
        if encoded:
            if value in _INT_ENCODINGS:
                size, fmt = _INT_ENCODINGS[value]
                data = self.src.read(size)
                return str(struct.unpack(fmt, data)[0]).encode() if keep else None
            if value == ENC_LZF:
                compressed = self.count()
                size = self.count()
                if 0 < keep and compressed <= keep and size <= keep:
                    return lzf_decompress(self.src.read(compressed), size)
                self.src.skip(compressed)
                return None
            raise RdbFormatError(f"unknown string encoding {value} at byte {self.src.consumed}")
        if 0 < keep and value <= keep:
            return self.src.read(value)
        self.src.skip(value)
        return None

    def text(self, limit: int = MAX_AUX_VALUE) -> str | None:
        """A short string as text; None when it is longer than ``limit`` bytes (skipped)."""
        data = self.string(keep=limit)
        return None if data is None else data.decode(errors="replace")

    def old_double(self) -> None:
        size = self.src.byte()
        if size < 253:
            self.src.skip(size)

    # ---- values -----------------------------------------------------------------------

    def skip_value(self, kind: int) -> None:
        src = self.src
        if kind == STRING or kind in _SINGLE_STRING_TYPES:
            self.string()
        elif kind in (LIST, SET, LIST_QUICKLIST):
            for _ in range(self.count()):
                self.string()
        elif kind == ZSET:
            for _ in range(self.count()):
                self.string()
                self.old_double()
        elif kind == ZSET_2:
            for _ in range(self.count()):
                self.string()
                src.skip(8)
        elif kind == HASH:
            for _ in range(self.count()):
                self.string()
                self.string()
        elif kind == LIST_QUICKLIST_2:
            for _ in range(self.count()):
                self.count()  # container: plain or packed
                self.string()
        elif kind in _STREAM_TYPES:
            self._skip_stream(kind)
        elif kind == MODULE_2:
            self.count()  # module id
            self._skip_module_value()
        elif kind in (HASH_METADATA, HASH_METADATA_PRE_GA):
            if kind == HASH_METADATA:
                src.skip(8)  # minimum field expiry
            for _ in range(self.count()):
                self.count()  # field TTL
                self.string()
                self.string()
        elif kind in (HASH_LISTPACK_EX, HASH_LISTPACK_EX_PRE_GA):
            if kind == HASH_LISTPACK_EX:
                src.skip(8)
            self.string()
        elif kind == MODULE_PRE_GA:
            raise RdbUnsupported("RDB holds a pre-GA module value (Redis 4.0 RC); cannot be read")
        else:
            raise RdbUnsupported(f"unknown value type {kind} at byte {src.consumed - 1}")

    def _skip_stream(self, kind: int) -> None:
        src = self.src
        for _ in range(self.count()):  # listpack nodes: master id + listpack
            self.string()
            self.string()
        self.count()  # length
        self.count(), self.count()  # last id
        if kind >= STREAM_LISTPACKS_2:
            for _ in range(5):  # first id, max deleted id, entries added
                self.count()
        for _ in range(self.count()):  # consumer groups
            self.string()
            self.count(), self.count()  # last delivered id
            if kind >= STREAM_LISTPACKS_2:
                self.count()  # entries read
            for _ in range(self.count()):  # group PEL: id, delivery time, delivery count
                src.skip(16 + 8)
                self.count()
            for _ in range(self.count()):  # consumers
                self.string()
                src.skip(8)  # seen time
                if kind >= STREAM_LISTPACKS_3:
                    src.skip(8)  # active time
                src.skip(16 * self.count())  # consumer PEL ids

    def _skip_module_value(self) -> None:
        while True:
            opcode = self.count()
            if opcode == MODULE_OP_EOF:
                return
            if opcode in (MODULE_OP_SINT, MODULE_OP_UINT):
                self.count()
            elif opcode == MODULE_OP_FLOAT:
                self.src.skip(4)
            elif opcode == MODULE_OP_DOUBLE:
                self.src.skip(8)
            elif opcode == MODULE_OP_STRING:
                self.string()
            else:
                raise RdbUnsupported(f"unknown module opcode {opcode} at byte {self.src.consumed}")

    # ---- the file ---------------------------------------------------------------------

    def parse(self) -> RdbSummary:
        src = self.src
        summary = RdbSummary()
        magic = src.read(9)
        if magic[:5] != b"REDIS" or not magic[5:].isdigit():
            raise RdbFormatError(f"not an RDB stream (starts with {magic[:9]!r})")
        summary.version = int(magic[5:])
        if summary.version > MAX_VERSION:
            raise RdbUnsupported(f"RDB version {summary.version} is newer than the {MAX_VERSION} backupd reads")
        db = 0
        has_expiry = False
        while True:
            op = src.byte()
            if op == OP_EOF:
                break
            if op == OP_SELECTDB:
                db = self.count()
                if db > MAX_DATABASE:
                    raise RdbFormatError(f"database number {db} is above the {MAX_DATABASE} backupd accepts "
                                         f"(byte {src.consumed})")
            elif op == OP_RESIZEDB:
                self.count(), self.count()
            elif op == OP_AUX:
                key, value = self.text(), self.text()
                if key is not None and value is not None and (key in summary.aux or len(summary.aux) < MAX_AUX_FIELDS):
                    summary.aux[key] = value
            elif op == OP_EXPIRETIME_MS:
                src.skip(8)
                has_expiry = True
            elif op == OP_EXPIRETIME:
                src.skip(4)
                has_expiry = True
            elif op == OP_IDLE:
                self.count()
            elif op == OP_FREQ:
                src.skip(1)
            elif op in (OP_FUNCTION2, OP_FUNCTION_PRE_GA):
                if op == OP_FUNCTION_PRE_GA:
                    raise RdbUnsupported("RDB holds pre-GA functions (Redis 7.0 RC); cannot be read")
                self.string()
                summary.functions += 1
            elif op == OP_SLOT_INFO:
                self.count(), self.count(), self.count()
            elif op == OP_MODULE_AUX:
                self.count(), self.count(), self.count()  # module id, when opcode, when
                self._skip_module_value()
            else:
                self.string()  # the key
                self.skip_value(op)
                summary.keys[db] = summary.keys.get(db, 0) + 1
                if has_expiry:
                    summary.expires[db] = summary.expires.get(db, 0) + 1
                has_expiry = False
        if summary.version >= 5:
            summary.checksum = src.read(8)[::-1].hex()
        summary.size = src.consumed
        if not src.at_end():
            raise RdbFormatError(f"{summary.size}-byte RDB is followed by unexpected data")
        return summary


def lzf_decompress(data: bytes, size: int) -> bytes:
    """LZF as Redis uses it for long strings (only short aux fields are decoded here)."""
    out = bytearray()
    i = 0
    try:
        while i < len(data):
            ctrl = data[i]
            i += 1
            if ctrl < 32:  # literal run of ctrl + 1 bytes
                if len(out) + ctrl + 1 > size or i + ctrl + 1 > len(data):
                    raise IndexError
                out += data[i:i + ctrl + 1]
                i += ctrl + 1
                continue
            length = ctrl >> 5
            if length == 7:
                length += data[i]
                i += 1
            if len(out) + length + 2 > size:
                raise IndexError
            ref = len(out) - ((ctrl & 0x1F) << 8) - data[i] - 1
            i += 1
            if ref < 0:
                raise IndexError
            for k in range(length + 2):  # back references may overlap what they produce
                out.append(out[ref + k])
    except IndexError:
        raise RdbFormatError("corrupt LZF-compressed string") from None
    if len(out) != size:
        raise RdbFormatError(f"LZF string decoded to {len(out)} bytes, expected {size}")
    return bytes(out)


def parse_stream(next_chunk: Callable[[], bytes]) -> RdbSummary:
    return RdbParser(ByteSource(next_chunk)).parse()
