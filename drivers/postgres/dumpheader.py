"""The header of a pg_dump custom-format archive: the first bytes of the dump stream.

It names the database, the server's version and pg_dump's own version, so a
backup learns pg_dump's version from what pg_dump wrote instead of running
``pg_dump --version`` while the dump competes for the CPU.
Layout (pg_backup_archiver.c, WriteHead; archive versions 1.12 to 1.16, PostgreSQL 11 to 17):
"PGDMP", major, minor, revision, int size, offset size, format byte;
compression (an int before 1.15, one algorithm byte from 1.15); the creation time as
seven ints; then three strings: database, server version, pg_dump version.
An int is a sign byte and ``int size`` bytes, least significant first; a string
is its length as an int (-1 for NULL) and that many bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = b"PGDMP"
#: Long enough for any header: 11 fixed bytes, eight ints, three short strings.
HEAD_SIZE = 4096
CUSTOM_FORMAT = 1


class HeaderError(ValueError):
    pass


@dataclass(frozen=True)
class DumpHeader:
    archive_version: tuple[int, int, int]
    database: str
    server_version: str
    pg_dump_version: str

    @property
    def pg_dump_release(self) -> str:
        """"15.20" of "15.20 (Debian 15.20-0+deb12u1)"."""
        return self.pg_dump_version.split(" ", 1)[0]


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0
        self.int_size = 4

    def take(self, count: int) -> bytes:
        if count < 0 or self.at + count > len(self.data):
            raise HeaderError("the archive header is truncated")
        piece = self.data[self.at:self.at + count]
        self.at += count
        return piece

    def byte(self) -> int:
        return self.take(1)[0]

    def integer(self) -> int:
        sign = self.byte()
        value = int.from_bytes(self.take(self.int_size), "little")
        return -value if sign else value

    def string(self) -> str:
        length = self.integer()
        return "" if length < 0 else self.take(length).decode("utf-8", errors="replace")


def parse(head: bytes) -> DumpHeader:
    cursor = _Cursor(head)
    if cursor.take(len(MAGIC)) != MAGIC:
        raise HeaderError("not a pg_dump archive (no PGDMP magic)")
    version = (cursor.byte(), cursor.byte(), cursor.byte())
    if version[0] != 1 or not 12 <= version[1] <= 16:
        raise HeaderError(f"pg_dump archive version {'.'.join(map(str, version))} is not one this parser knows")
    cursor.int_size = cursor.byte()
    if not 1 <= cursor.int_size <= 8:
        raise HeaderError(f"pg_dump archive int size {cursor.int_size} is invalid")
    cursor.byte()  # offset size
    if (archive_format := cursor.byte()) != CUSTOM_FORMAT:
        raise HeaderError(f"pg_dump archive format {archive_format} is not custom (1)")
    if version[1] >= 15:
        cursor.byte()  # compression algorithm
    else:
        cursor.integer()  # compression level
    for _ in range(7):  # tm_sec .. tm_isdst
        cursor.integer()
    header = DumpHeader(version, database=cursor.string(), server_version=cursor.string(),
                        pg_dump_version=cursor.string())
    if not header.pg_dump_version[:1].isdigit():
        raise HeaderError(f"pg_dump archive header names no pg_dump version (got {header.pg_dump_version[:40]!r})")
    return header
