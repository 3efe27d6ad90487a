"""The manifest: the commit point of a backup and the whole description of it."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from backupd.errors import IntegrityError
from backupd.timeutil import format_timestamp, parse_timestamp

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: Bounds on what is read from the repository: whoever can write there chooses these bytes.
MAX_MANIFEST_BYTES = 64 << 20
MAX_JSON_DEPTH = 64


def json_depth(value: Any) -> int:
    """How deeply ``value`` nests lists and objects (iteratively: no recursion on hostile input)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            items: Any = item.values()
        elif isinstance(item, list):
            items = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in items)
    return deepest


def _typed(data: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = data.get(name, default)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise TypeError(f"{name} is not a {kind.__name__}")
    return value


@dataclass(frozen=True)
class ObjectEntry:
    """One stored stream: ``<stream>.zst.age`` inside the backup's directory."""

    name: str
    key: str
    raw_size: int
    stored_size: int
    sha256: str


@dataclass(frozen=True)
class PitrStart:
    """Where a backup's archived logs begin: ``metadata.pitr`` in its manifest.

    A driver that archives logs reports one in its ``BackupResult``; the core reads it
    back (retention keeps the logs from ``first_log`` on, ``list`` and ``status`` show
    the PITR window from ``since``). In the manifest it is
    ``{"log_kind": ..., "first_log": ..., "from": <RFC 3339>}``, in that order.
    """

    log_kind: str  #: "wal", "binlog" or "oplog"; "" when a manifest lacks it
    first_log: str  #: the first archived log replay from this backup needs; "" when a manifest lacks it
    since: dt.datetime  #: the backup's consistent point: the earliest moment it restores to

    def to_metadata(self) -> dict[str, str]:
        return {"log_kind": self.log_kind, "first_log": self.first_log, "from": format_timestamp(self.since)}

    @staticmethod
    def recorded(manifest: Manifest) -> bool:
        """Whether the backup records a log start at all (its driver archived logs for it)."""
        return isinstance(manifest.metadata.get("pitr"), dict)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> PitrStart | None:
        """The backup's log start; None when it records none or none readable (``read`` says why)."""
        try:
            return cls.read(manifest)
        except ValueError:
            return None

    @classmethod
    def read(cls, manifest: Manifest) -> PitrStart | None:
        """The backup's log start; None when it records none; ValueError naming what is malformed."""
        pitr = manifest.metadata.get("pitr")
        if pitr is None:
            return None
        if not isinstance(pitr, dict):
            raise ValueError("metadata.pitr is not an object")
        if not pitr.get("from"):
            raise ValueError("metadata.pitr has no 'from'")
        try:
            return cls(_typed(pitr, "log_kind", str, ""), _typed(pitr, "first_log", str, ""),
                       parse_timestamp(_typed(pitr, "from", str, "")))
        except TypeError as exc:
            raise ValueError(f"metadata.pitr: {exc}") from None


@dataclass
class Manifest:
    backup_id: str
    job: str
    driver: str
    method: str
    started_at: dt.datetime
    finished_at: dt.datetime
    objects: list[ObjectEntry]
    compression: dict[str, Any]
    encryption: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    row_counts: dict[str, int] = field(default_factory=dict)
    tool_versions: dict[str, str] = field(default_factory=dict)
    host: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def raw_size(self) -> int:
        return sum(obj.raw_size for obj in self.objects)

    @property
    def stored_size(self) -> int:
        return sum(obj.stored_size for obj in self.objects)

    @property
    def backup_type(self) -> str:
        """full, diff or incr (DESIGN.md "Backup types"); ``metadata.type``, "full" where it is missing."""
        return str(self.metadata.get("type") or "full")

    @property
    def parent(self) -> str | None:
        """The backup a diff or incr was taken against (``metadata.parent``); None for a full."""
        parent = self.metadata.get("parent")
        return str(parent) if parent else None

    @property
    def duration_seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    def object(self, name: str) -> ObjectEntry:
        for obj in self.objects:
            if obj.name == name:
                return obj
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "backup_id": self.backup_id,
            "job": self.job,
            "driver": self.driver,
            "method": self.method,
            "host": self.host,
            "started_at": format_timestamp(self.started_at),
            "finished_at": format_timestamp(self.finished_at),
            "duration_seconds": round(self.duration_seconds, 3),
            "raw_size": self.raw_size,
            "stored_size": self.stored_size,
            "compression": self.compression,
            "encryption": self.encryption,
            "objects": [asdict(obj) for obj in self.objects],
            "row_counts": self.row_counts,
            "metadata": self.metadata,
            "tool_versions": self.tool_versions,
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n").encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        if not isinstance(data, dict):
            raise TypeError("the manifest is not a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise IntegrityError(f"manifest format_version {version!r} is not supported (this backupd reads {FORMAT_VERSION})")
        objects = _typed(data, "objects", list, None)
        for obj in objects:
            if not isinstance(obj, dict):
                raise TypeError("an entry of objects is not an object")
            for name in ("name", "key", "sha256"):
                _typed(obj, name, str, None)
            for name in ("raw_size", "stored_size"):
                if _typed(obj, name, int, None) < 0:
                    raise ValueError(f"objects: {name} is negative")
        row_counts = _typed(data, "row_counts", dict, {})
        if not all(isinstance(count, int) and not isinstance(count, bool) for count in row_counts.values()):
            raise TypeError("row_counts holds a count that is not an integer")
        return cls(
            format_version=version,
            backup_id=_typed(data, "backup_id", str, None),
            job=_typed(data, "job", str, None),
            driver=_typed(data, "driver", str, None),
            method=_typed(data, "method", str, None),
            host=_typed(data, "host", str, ""),
            started_at=parse_timestamp(_typed(data, "started_at", str, None)),
            finished_at=parse_timestamp(_typed(data, "finished_at", str, None)),
            objects=[ObjectEntry(**obj) for obj in objects],
            compression=_typed(data, "compression", dict, None),
            encryption=_typed(data, "encryption", dict, None),
            metadata=_typed(data, "metadata", dict, {}),
            row_counts=row_counts,
            tool_versions=_typed(data, "tool_versions", dict, {}),
        )

    @classmethod
    def from_json(cls, raw: bytes, where: str = "manifest") -> "Manifest":
        """Parse and check a manifest; IntegrityError (one line, naming ``where``) for anything wrong with it."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise IntegrityError(f"{where}: manifest of {len(raw)} bytes exceeds the limit of {MAX_MANIFEST_BYTES}")
        try:
            data = json.loads(raw)
        except RecursionError:
            raise IntegrityError(f"{where}: unreadable manifest (JSON nested too deeply)") from None
        except ValueError as exc:
            raise IntegrityError(f"{where}: unreadable manifest ({exc.__class__.__name__}: {exc})") from None
        if json_depth(data) > MAX_JSON_DEPTH:
            raise IntegrityError(f"{where}: unreadable manifest (JSON nested deeper than {MAX_JSON_DEPTH} levels)")
        try:
            return cls.from_dict(data)
        except IntegrityError as exc:
            raise IntegrityError(f"{where}: {exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{where}: unreadable manifest ({exc.__class__.__name__}: {exc})") from None
