"""The per-file map of a file-engine backup: every file of the cluster, its chunks' checksums, and which
object of which backup holds each range of it.

It is a stream of the backup (``data-filemap``, JSON), and the signed manifest records its plaintext sha256 and
size (``metadata.file_map_stream``): the map grows with the cluster (~256 KiB a GiB), the manifest must not.
Backups taken before carry the map in the manifest itself (``metadata.file_map``); ``read_map`` takes it
from wherever it is. A restore knows every object it needs before reading one. A file is a
sequence of ``CHUNK``-byte chunks; ``hashes`` has one sha256 truncated to 96 bits (base64) per chunk. A part
``[backup, object, member, first, count, member_first]`` says that chunks ``first..first+count-1`` are
chunks ``member_first..`` of tar member ``member`` in object ``object`` of backup ``backup``
(None: the backup this manifest describes).
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterable

from backupd.errors import IntegrityError
from backupd.manifest import Manifest

CHUNK = 64 << 10
MAP_STREAM = "data-filemap"  #: sorts with the data objects, after ``base``
STREAM_KEY = "file_map_stream"  #: the manifest's facts about the map stream
LEGACY_KEY = "file_map"  #: the map itself, in manifests written before the stream
MAX_MAP_BYTES = 4 << 30  #: a bound on hostile input: ~16 TiB of cluster
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


def encode(files: FileMap) -> tuple[bytes, dict[str, Any]]:
    """The map stream's plaintext and the facts the manifest records about it."""
    data = json.dumps(files.to_metadata(), separators=(",", ":")).encode()
    facts = {"object": MAP_STREAM, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
             "files": len(files.files), "dirs": len(set(files.dirs))}
    return data, facts


def stream_facts(manifest: Manifest) -> tuple[str, int] | None:
    """The map stream's plaintext sha256 and size the manifest vouches for (None: the map is in the manifest)."""
    facts = manifest.metadata.get(STREAM_KEY)
    if facts is None:
        return None
    where = f"backup {manifest.backup_id}"
    if not isinstance(facts, dict):
        raise IntegrityError(f"{where}: metadata.{STREAM_KEY} is not an object")
    digest, size = facts.get("sha256"), facts.get("size")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise IntegrityError(f"{where}: metadata.{STREAM_KEY}.sha256 is not a sha256")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_MAP_BYTES:
        raise IntegrityError(f"{where}: metadata.{STREAM_KEY}.size {size!r} is not between 1 and {MAX_MAP_BYTES}")
    return digest, size


def has_map(manifest: Manifest) -> bool:
    return LEGACY_KEY in manifest.metadata or STREAM_KEY in manifest.metadata


def matches(manifest: Manifest, data: bytes) -> bool:
    """Whether ``data`` is the map stream's plaintext the manifest vouches for."""
    facts = stream_facts(manifest)
    return facts is not None and len(data) == facts[1] and hashlib.sha256(data).hexdigest() == facts[0]


def read_stream(manifest: Manifest, stream: BinaryIO) -> bytes:
    """The map stream's plaintext, refused unless its size and sha256 are the manifest's (read no further)."""
    facts = stream_facts(manifest)
    where = f"backup {manifest.backup_id}: object {MAP_STREAM}"
    if facts is None:
        raise IntegrityError(f"backup {manifest.backup_id}: metadata.{STREAM_KEY} is missing")
    data = bytearray()
    while len(data) <= facts[1] and (block := stream.read(min(1 << 20, facts[1] + 1 - len(data)))):
        data += block
    if len(data) != facts[1] or hashlib.sha256(data).hexdigest() != facts[0]:
        raise IntegrityError(f"{where} does not match the sha256 and size its manifest records")
    return bytes(data)


def parse_stream(manifest: Manifest, data: bytes) -> FileMap:
    """A map stream's plaintext (already matched against the manifest), parsed as defensively as the rest."""
    where = f"backup {manifest.backup_id}: object {MAP_STREAM}"
    try:
        table = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"{where} is not JSON: {exc}") from None
    return FileMap.from_metadata({LEGACY_KEY: table}, where)


def read_map(manifest: Manifest, local: Callable[[Manifest], bytes | None] | None = None,
             open_stream: Callable[[], BinaryIO] | None = None) -> FileMap:
    """The backup's map, from wherever it is: the manifest (older backups), a local copy ``local`` returns
    (matched against the manifest), else the map stream ``open_stream`` opens."""
    where = f"backup {manifest.backup_id}"
    if STREAM_KEY not in manifest.metadata:
        return FileMap.from_metadata(manifest.metadata, where)
    stream_facts(manifest)
    data = local(manifest) if local is not None else None
    if data is None:
        if open_stream is None:
            raise IntegrityError(f"{where}: its file map is neither kept on this host nor readable without the "
                                 "identity file")
        with open_stream() as stream:
            data = read_stream(manifest, stream)
    return parse_stream(manifest, data)
