"""Reads of a job with several repositories that judge each repository's copy on its own.

``backupd.copies.Copies`` falls back for an object that is missing, or (``open_object``) whose
sha256 differs from its manifest's. Two kinds of objects carry no digest to check beforehand:

A manifest is read from the first repository whose copy is usable (it parses, names its own
backup and job, and, with trusted keys, is signed by one): ``CopiesRepository``.

A log object records no stored digest a reader could check before using it, so a copy is
judged by decoding it: it is decrypted (age authenticates every chunk) and, when signed,
checked against its signature into a private temporary file; a copy that is missing, corrupt,
truncated or untrusted is passed over for the next repository's, and the fallback is logged.
Replay then reads the checked plaintext, so a bad copy never reaches PostgreSQL or mysqlbinlog.
"""

from __future__ import annotations

import copy
import tempfile
from typing import BinaryIO, Callable, Sequence

import structlog

from backupd.age import AgeError
from backupd.copies import Copies
from backupd.errors import BackupNotFound, CryptoError, IntegrityError, ObjectNotFound, StorageError
from backupd.logarchive import LogArchive
from backupd.index import Index
from backupd.manifest import Manifest
from backupd.pipeline import READ_CHUNK, DecodingReader
from backupd.repository import Repository
from backupd.signing import Trust
from backupd.storage import Storage

log = structlog.get_logger(__name__)


class CopiesRepository(Repository):
    """A ``Repository`` over ``Copies`` whose manifests are read from the first repository with a usable one."""

    def read_manifest(self, backup_id: str) -> tuple[Manifest, Trust | None]:
        assert isinstance(self.storage, Copies)
        problems: list[str] = []
        fallback: tuple[Manifest, Trust | None] | None = None
        first_error: IntegrityError | None = None
        for storage_name, backend in self.storage.backends.items():
            one = copy.copy(self)
            one.storage = backend
            try:
                manifest, trust = Repository.read_manifest(one, backup_id)
            except BackupNotFound:
                problems.append(f"{storage_name}: missing")
                continue
            except (IntegrityError, StorageError) as exc:
                first_error = first_error or (exc if isinstance(exc, IntegrityError) else None)
                problems.append(f"{storage_name}: {exc}")
                continue
            if trust is not None and trust.status != "signed":
                fallback = fallback or (manifest, trust)
                problems.append(f"{storage_name}: {trust.status}")
                continue
            if problems:
                log.warning("manifest read from another repository", job=self.job, backup_id=backup_id,
                            storage=storage_name, problems="; ".join(problems))
            return manifest, trust
        if fallback is not None:
            return fallback  # no signed copy anywhere: the caller says why it is not trusted
        if first_error is not None:
            raise first_error
        raise BackupNotFound(f"backup {backup_id} not found for job {self.job} in {self.storage.location}")


    def update_index(self, change: Callable[[Index], None]) -> None:
        """Each repository keeps its own index: the change is applied to each (one that fails is left to
        its next reader, which catches up with or rebuilds from its manifests)."""
        assert isinstance(self.storage, Copies)
        for name, backend in self.storage.backends.items():
            member = Repository(backend, self.job, retain_for=self.retain_for, signing_key_file=self.signing_key_file,
                                trusted=self.trusted, allow_unsigned=self.allow_unsigned)
            try:
                member.update_index(change)
            except StorageError as exc:
                log.warning("index of one repository not updated", job=self.job, storage=name, error=str(exc))
        self._index = None  # read again (across the repositories) when next needed

    def read_for_index(self, backup_id: str) -> tuple[Manifest, tuple[str, str | None, str]]:
        """As ``read_manifest``: from the first repository whose copy parses (and, with trusted keys, is signed)."""
        assert isinstance(self.storage, Copies)
        fallback: tuple[Manifest, tuple[str, str | None, str]] | None = None
        first_error: IntegrityError | None = None
        for backend in self.storage.backends.values():
            one = copy.copy(self)
            one.storage = backend
            try:
                manifest, status = Repository.read_for_index(one, backup_id)
            except BackupNotFound:
                continue
            except (IntegrityError, StorageError) as exc:
                first_error = first_error or (exc if isinstance(exc, IntegrityError) else None)
                continue
            if self.trusted and status[0] != "signed":
                fallback = fallback or (manifest, status)
                continue
            return manifest, status
        if fallback is not None:
            return fallback
        if first_error is not None:
            raise first_error
        raise BackupNotFound(f"backup {backup_id} not found for job {self.job} in {self.storage.location}")


class CopiesLogArchive(LogArchive):
    """A ``LogArchive`` over ``Copies``: pushes fan out, ``open`` falls back repository by repository."""

    def _open_in(self, storage: Storage, name: str, identities: Sequence[object], key_file: str | None) -> DecodingReader:
        """``LogArchive.open`` on one repository alone."""
        one = copy.copy(self)
        one.storage = storage
        return LogArchive.open(one, name, identities, key_file)

    def open(self, name: str, identities: Sequence[object], key_file: str | None = None) -> DecodingReader:
        assert isinstance(self.storage, Copies)
        problems: list[str] = []
        missing = 0
        first_error: Exception | None = None
        for storage_name, backend in self.storage.backends.items():
            spool: BinaryIO = tempfile.TemporaryFile()  # type: ignore[assignment]  # 0600, gone when closed
            try:
                with self._open_in(backend, name, identities, key_file) as reader:
                    while chunk := reader.read(READ_CHUNK):
                        spool.write(chunk)
            except ObjectNotFound:
                spool.close()
                missing += 1
                problems.append(f"{storage_name}: missing")
                continue
            except (StorageError, IntegrityError, CryptoError, AgeError) as exc:
                spool.close()
                first_error = first_error or exc
                problems.append(f"{storage_name}: {exc}")
                continue
            spool.seek(0)
            if problems:
                log.warning("log read from another repository", job=self.job, log=name, storage=storage_name,
                            problems="; ".join(problems))
            return spool  # type: ignore[return-value]
        if missing == len(self.storage.backends):
            raise ObjectNotFound(f"{self.key(name)}: in none of the repositories ({', '.join(self.storage.backends)})")
        assert first_error is not None
        log.error("no repository holds a good copy of the log", job=self.job, log=name, problems="; ".join(problems))
        raise first_error
