"""Archived logs whose signatures a verification has already checked, so the next one checks only new logs.

A nightly verification with trusted keys must not read one signature per archived log (a
million WAL segments: a million GETs a night). ``state_dir/vouched.sqlite3`` remembers each log
object that a trusted signature vouched for, by what its listing shows (key, stored size, time it
arrived, and the same of its signature object), under the set of keys that were trusted then.
A log or signature replaced or removed since, or a change of trusted keys, is checked again. This is an early warning only: replay
(``LogArchive.open``) checks every log's signature and content whatever this cache says.

A missing, unreadable or unwritable cache only means "check everything".
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from pathlib import Path
from typing import Iterator, Sequence

import structlog

from backupd.logarchive import LogObject

log = structlog.get_logger(__name__)

FILE_NAME = "vouched.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS vouched (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    facts TEXT NOT NULL,
    PRIMARY KEY (scope, key)
)
"""


def _facts(obj: LogObject) -> str:
    """What the listing shows of the log and of its signature: either replaced, removed or added, it differs."""
    arrived = obj.modified.isoformat() if obj.modified is not None else "-"
    return f"{obj.stored_size}:{arrived}:{obj.signature or '-'}"


class Vouched:
    """The logs of one repository of one job already vouched for under one set of trusted keys."""

    def __init__(self, state_dir: Path, location: str, job: str, trusted: Sequence[object]) -> None:
        keys = "\n".join(sorted(str(key) for key in trusted))
        self.scope = hashlib.sha256(f"{location}\n{job}\n{keys}".encode()).hexdigest()
        self.path = state_dir / FILE_NAME
        self._db: sqlite3.Connection | None = None
        self.checked = 0  #: objects handed out for checking
        with contextlib.suppress(sqlite3.Error, OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path)
            self._db.execute(SCHEMA)

    def unchecked(self, objects: Iterator[LogObject]) -> Iterator[LogObject]:
        """The objects not vouched for yet with the facts their listing shows now."""
        for obj in objects:
            if self._db is None:
                self.checked += 1
                yield obj
                continue
            try:
                row = self._db.execute("SELECT facts FROM vouched WHERE scope = ? AND key = ?",
                                       (self.scope, obj.key)).fetchone()
            except sqlite3.Error:
                row = None
            if row is None or row[0] != _facts(obj):
                self.checked += 1
                yield obj

    def remember(self, obj: LogObject) -> None:
        if self._db is None:
            return
        try:
            self._db.execute("INSERT OR REPLACE INTO vouched (scope, key, facts) VALUES (?, ?, ?)",
                             (self.scope, obj.key, _facts(obj)))
        except sqlite3.Error as exc:
            log.debug("cannot remember a vouched log", key=obj.key, error=str(exc))

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.commit()
                self._db.close()
            self._db = None
