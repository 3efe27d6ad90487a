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


@dataclass(frozen=True)
class ObjectEntry:
    """One stored stream: ``<stream>.zst.age`` inside the backup's directory."""

    name: str
    key: str
    raw_size: int
    stored_size: int
    sha256: str


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
        """full, diff or incr (DESIGN.md "Backup types"); every backup taken so far is full."""
        return str(self.metadata.get("type") or "full")

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
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise IntegrityError(f"manifest format_version {version!r} is not supported (this backupd reads {FORMAT_VERSION})")
        return cls(
            format_version=version,
            backup_id=data["backup_id"],
            job=data["job"],
            driver=data["driver"],
            method=data["method"],
            host=data.get("host", ""),
            started_at=parse_timestamp(data["started_at"]),
            finished_at=parse_timestamp(data["finished_at"]),
            objects=[ObjectEntry(**obj) for obj in data["objects"]],
            compression=data["compression"],
            encryption=data["encryption"],
            metadata=data.get("metadata", {}),
            row_counts=data.get("row_counts", {}),
            tool_versions=data.get("tool_versions", {}),
        )

    @classmethod
    def from_json(cls, raw: bytes, where: str = "manifest") -> "Manifest":
        try:
            return cls.from_dict(json.loads(raw))
        except IntegrityError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{where}: unreadable manifest ({exc.__class__.__name__}: {exc})") from None
