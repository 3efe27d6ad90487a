"""A local cache of manifests, so ``list`` on a big repository reads each manifest once.

Storage is the truth: every sync lists the repository, fetches only manifests the
cache lacks and forgets those no longer in storage. The cache lives in
``state_dir/catalog.sqlite3``; when it is missing or unusable it is rebuilt (or
simply skipped on a host where state_dir is not writable).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import structlog

from backupd.errors import BackupNotFound, IntegrityError
from backupd.manifest import Manifest
from backupd.repository import Repository
from backupd.timeutil import backup_id_sort_key

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    location TEXT NOT NULL,
    job TEXT NOT NULL,
    backup_id TEXT NOT NULL,
    manifest BLOB NOT NULL,
    PRIMARY KEY (location, job, backup_id)
)
"""


class Catalog:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "catalog.sqlite3"
        self._db: sqlite3.Connection | None = None
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._db = self._open()
        except (OSError, sqlite3.Error) as exc:
            log.debug("catalog cache unavailable, reading storage directly", path=str(self.path), error=str(exc))

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path)
            db.execute(SCHEMA)
            return db
        except sqlite3.DatabaseError:
            # A corrupt cache is rebuilt, never trusted.
            self.path.unlink(missing_ok=True)
            db = sqlite3.connect(self.path)
            db.execute(SCHEMA)
            return db

    def manifests(self, repo: Repository) -> list[Manifest]:
        """Every committed backup of the job, newest first, synced with storage."""
        ids = repo.backup_ids()
        if self._db is None:
            return repo.manifests()
        location = repo.storage.location
        cached = {
            row[0]: row[1]
            for row in self._db.execute(
                "SELECT backup_id, manifest FROM manifests WHERE location = ? AND job = ?", (location, repo.job)
            )
        }
        result: list[Manifest] = []
        with self._db:
            for backup_id in ids:
                if backup_id in cached:
                    result.append(Manifest.from_json(cached.pop(backup_id)))
                    continue
                try:
                    manifest = repo.load_manifest(backup_id)
                except (IntegrityError, BackupNotFound) as exc:  # one bad manifest does not hide the others
                    log.warning("backup skipped: its manifest is unusable", job=repo.job, backup_id=backup_id,
                                error=str(exc))
                    continue
                self._db.execute(
                    "INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?)",
                    (location, repo.job, backup_id, manifest.to_json()),
                )
                result.append(manifest)
            for gone in cached:
                self._db.execute(
                    "DELETE FROM manifests WHERE location = ? AND job = ? AND backup_id = ?", (location, repo.job, gone)
                )
        result.sort(key=lambda m: backup_id_sort_key(m.backup_id), reverse=True)
        return result

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
