"""A local cache of manifests, so ``list`` on a big repository reads each manifest once.

Storage is the truth: every sync lists the repository, fetches only manifests the
cache lacks and forgets those no longer in storage. The cache lives in
``state_dir/catalog.sqlite3``; when it is missing or unusable it is rebuilt (or
simply skipped on a host where state_dir is not writable).

With trusted keys, a manifest is cached with the key that signed it and used from the
cache only while that key is still trusted; unsigned and badly signed manifests are
never cached (read and judged again at every sync).
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import structlog

from backupd.errors import BackupNotFound, IntegrityError, UntrustedObject
from backupd.manifest import Manifest
from backupd.repository import Repository
from backupd.signing import Trust
from backupd.timeutil import backup_id_sort_key

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    location TEXT NOT NULL,
    job TEXT NOT NULL,
    backup_id TEXT NOT NULL,
    manifest BLOB NOT NULL,
    PRIMARY KEY (location, job, backup_id)
);
CREATE TABLE IF NOT EXISTS signers (
    location TEXT NOT NULL,
    job TEXT NOT NULL,
    backup_id TEXT NOT NULL,
    signer BLOB NOT NULL,
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
            db.executescript(SCHEMA)
            return db
        except sqlite3.DatabaseError:
            # A corrupt cache is rebuilt, never trusted.
            self.path.unlink(missing_ok=True)
            db = sqlite3.connect(self.path)
            db.executescript(SCHEMA)
            return db

    def manifests(self, repo: Repository) -> list[Manifest]:
        """Every committed backup of the job that may be used, newest first, synced with storage.

        With trusted keys, one no trusted key signed is skipped with a warning naming it."""
        usable = []
        for manifest, trust in self.entries(repo):
            try:
                repo.require_trusted(manifest, trust)
            except UntrustedObject as exc:
                log.warning("backup skipped: its manifest is not trusted", job=repo.job,
                            backup_id=manifest.backup_id, error=str(exc))
                continue
            usable.append(manifest)
        return usable

    def entries(self, repo: Repository) -> list[tuple[Manifest, Trust | None]]:
        """Every committed backup with a readable manifest, newest first, with what its signature says
        (None: the job has no trusted keys); an unreadable manifest is skipped with a warning."""
        ids = repo.backup_ids()
        location = repo.storage.location
        cached: dict[str, bytes] = {}
        signers: dict[str, bytes] = {}
        if self._db is not None:
            where = (location, repo.job)
            cached = dict(self._db.execute("SELECT backup_id, manifest FROM manifests WHERE location = ? AND job = ?",
                                           where))
            signers = dict(self._db.execute("SELECT backup_id, signer FROM signers WHERE location = ? AND job = ?",
                                            where))
        result: list[tuple[Manifest, Trust | None]] = []
        with self._db if self._db is not None else contextlib.nullcontext():  # one transaction
            self._sync(repo, ids, cached, signers, result)
        result.sort(key=lambda entry: backup_id_sort_key(entry[0].backup_id), reverse=True)
        return result

    def _sync(self, repo: Repository, ids: list[str], cached: dict[str, bytes], signers: dict[str, bytes],
              result: list[tuple[Manifest, Trust | None]]) -> None:
        location = repo.storage.location
        for backup_id in ids:
            raw = cached.pop(backup_id, None)
            if raw is not None:
                known = _cached_trust(repo, signers.get(backup_id))
                if known is not False:
                    result.append((Manifest.from_json(raw), known if isinstance(known, Trust) else None))
                    continue
            try:
                manifest, trust = repo.read_manifest(backup_id)
            except (IntegrityError, BackupNotFound) as exc:  # one bad manifest does not hide the others
                log.warning("backup skipped: its manifest is unusable", job=repo.job, backup_id=backup_id,
                            error=str(exc))
                self._forget(location, repo.job, backup_id)
                continue
            result.append((manifest, trust))
            if trust is None or trust.status == "signed":
                self._remember(location, repo.job, manifest, trust)
            else:
                self._forget(location, repo.job, backup_id)
        for gone in cached:
            self._forget(location, repo.job, gone)

    def _remember(self, location: str, job: str, manifest: Manifest, trust: Trust | None) -> None:
        if self._db is None:
            return
        self._db.execute("INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?)",
                         (location, job, manifest.backup_id, manifest.to_json()))
        if trust is not None and trust.signer is not None:
            self._db.execute("INSERT OR REPLACE INTO signers VALUES (?, ?, ?, ?)",
                             (location, job, manifest.backup_id, trust.signer.raw))

    def _forget(self, location: str, job: str, backup_id: str) -> None:
        if self._db is None:
            return
        for table in ("manifests", "signers"):
            self._db.execute(f"DELETE FROM {table} WHERE location = ? AND job = ? AND backup_id = ?",
                             (location, job, backup_id))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _cached_trust(repo: Repository, signer: bytes | None) -> Trust | None | bool:
    """What a cached manifest's signature says, or False when it must be read and checked again
    (no trusted keys: None; signed by a key that is still trusted: that key)."""
    if not repo.trusted:
        return None
    for key in repo.trusted:
        if signer is not None and key.raw == signer:
            return Trust("signed", key)
    return False

