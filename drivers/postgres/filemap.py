"""The per-file map of a file-engine backup: every file of the cluster, its chunks' checksums, and which
object of which backup holds each range of it.

It sits in the signed manifest (``metadata.file_map``), so a host holding only public keys can plan the
next diff or incr from it, and a restore knows every object it needs before reading one. A file is a
sequence of ``CHUNK``-byte chunks; ``hashes`` has one sha256 truncated to 96 bits (base64) per chunk. A part
``[backup, object, member, first, count, member_first]`` says that chunks ``first..first+count-1`` are
chunks ``member_first..`` of tar member ``member`` in object ``object`` of backup ``backup``
(None: the backup this manifest describes).
"""

from __future__ import annotations

import base64
import hashlib
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterable

from backupd.errors import IntegrityError

CHUNK = 64 << 10
HASH_BYTES = 12
HASH_CHARS = 16  #: base64 of HASH_BYTES: no padding


def chunk_hash(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()[:HASH_BYTES]).decode()


def chunk_count(size: int) -> int:
    return max(1, -(-size // CHUNK))


def chunk_length(size: int, index: int) -> int:
    """Bytes of chunk ``index`` of a file of ``size`` bytes (the last one may be short, or empty for an empty file)."""
    return max(0, min(CHUNK, size - index * CHUNK))


@dataclass(frozen=True)
class Part:
    backup: str | None
    object: str
    member: str
    first: int
    count: int
    member_first: int

    def held_by(self, own: str) -> "Part":
        """This part as a later backup references it: ``None`` resolved to the backup that holds it."""
        return self if self.backup is not None else Part(own, self.object, self.member, self.first, self.count,
                                                          self.member_first)

    def to_list(self) -> list[Any]:
        return [self.backup, self.object, self.member, self.first, self.count, self.member_first]


@dataclass
class FileEntry:
    path: str
    size: int
    mtime_ns: int
    hashes: list[str]
    parts: list[Part] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns, "hashes": "".join(self.hashes),
                "parts": [part.to_list() for part in self.parts]}


def check_path(path: str, where: str) -> str:
    """A relative, normalised path inside the data directory; anything else is hostile."""
    if (not path or path.startswith("/") or "\\" in path or "\0" in path or posixpath.normpath(path) != path
            or path.split("/")[0] in ("..", ".") or ".." in path.split("/")):
        raise IntegrityError(f"{where}: path {path!r} is not a plain relative path inside the data directory")
    return path


def _int(value: Any, what: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise IntegrityError(f"{where}: {what} is not a non-negative integer (got {value!r})")
    return value


def _str(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise IntegrityError(f"{where}: {what} is not a string (got {value!r})")
    return value


def parse_entry(data: Any, where: str) -> FileEntry:
    """One entry of ``metadata.file_map.files``, checked: paths, sizes, and parts that cover every chunk exactly once."""
    if not isinstance(data, dict):
        raise IntegrityError(f"{where}: a file entry is not an object")
    path = check_path(_str(data.get("path"), "path", where), where)
    where = f"{where}: {path}"
    size = _int(data.get("size"), "size", where)
    mtime = _int(data.get("mtime_ns"), "mtime_ns", where)
    packed = data.get("hashes")
    count = chunk_count(size)
    if not isinstance(packed, str) or len(packed) != count * HASH_CHARS:
        raise IntegrityError(f"{where}: expected {count} chunk checksums")
    hashes = [packed[i:i + HASH_CHARS] for i in range(0, len(packed), HASH_CHARS)]
    raw_parts = data.get("parts")
    if not isinstance(raw_parts, list):
        raise IntegrityError(f"{where}: parts is not a list")
    parts, covered = [], 0
    for raw in sorted(raw_parts, key=lambda p: p[3] if isinstance(p, list) and len(p) == 6 else -1):
        if not isinstance(raw, list) or len(raw) != 6:
            raise IntegrityError(f"{where}: a part is not a list of six")
        backup = None if raw[0] is None else _str(raw[0], "part backup", where)
        part = Part(backup, _str(raw[1], "part object", where), _str(raw[2], "part member", where),
                    _int(raw[3], "part first", where), _int(raw[4], "part count", where),
                    _int(raw[5], "part member_first", where))
        if part.first != covered or part.count < 1:
            raise IntegrityError(f"{where}: parts do not cover its chunks in order")
        covered += part.count
        parts.append(part)
    if covered != count:
        raise IntegrityError(f"{where}: parts cover {covered} chunks of {count}")
    return FileEntry(path, size, mtime, hashes, parts)


@dataclass
class FileMap:
    files: dict[str, FileEntry]
    dirs: list[str]

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], where: str) -> "FileMap":
        table = metadata.get("file_map")
        if not isinstance(table, dict):
            raise IntegrityError(f"{where}: metadata.file_map is not an object")
        if table.get("chunk_size") != CHUNK:
            raise IntegrityError(f"{where}: file_map.chunk_size {table.get('chunk_size')!r} is not {CHUNK}")
        files = table.get("files")
        dirs = table.get("dirs", [])
        if not isinstance(files, list) or not isinstance(dirs, list):
            raise IntegrityError(f"{where}: file_map.files or file_map.dirs is not a list")
        entries: dict[str, FileEntry] = {}
        for raw in files:
            entry = parse_entry(raw, where)
            if entry.path in entries:
                raise IntegrityError(f"{where}: {entry.path} is listed twice")
            entries[entry.path] = entry
        return cls(entries, [check_path(_str(d, "dir", where), where) for d in dirs])

    def to_metadata(self) -> dict[str, Any]:
        return {"chunk_size": CHUNK, "files": [self.files[path].to_dict() for path in sorted(self.files)],
                "dirs": sorted(set(self.dirs))}

    def holders(self) -> set[str | None]:
        return {part.backup for entry in self.files.values() for part in entry.parts}


def merge_parts(parts: Iterable[Part]) -> list[Part]:
    """Adjacent parts from the same member and contiguous in it, joined (a file stored whole stays one part)."""
    merged: list[Part] = []
    for part in parts:
        last = merged[-1] if merged else None
        if (last is not None and (last.backup, last.object, last.member) == (part.backup, part.object, part.member)
                and last.first + last.count == part.first and last.member_first + last.count == part.member_first):
            merged[-1] = Part(last.backup, last.object, last.member, last.first, last.count + part.count,
                              last.member_first)
        else:
            merged.append(part)
    return merged
