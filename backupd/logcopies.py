"""Archived logs of a job with several repositories: a log is read from the first repository whose copy is good.

Pushes go through ``backupd.copies.Copies`` unchanged (every repository gets the same bytes).
A log object records no stored digest a reader could check before using it, so a copy is
judged by decoding it: it is decrypted (age authenticates every chunk) and, when signed,
checked against its signature into a private temporary file; a copy that is missing, corrupt,
truncated or untrusted is passed over for the next repository's, and the fallback is logged.
Replay then reads the checked plaintext, so a bad copy never reaches PostgreSQL or mysqlbinlog.
"""

from __future__ import annotations

import copy
import tempfile
from typing import BinaryIO, Sequence

import structlog

from backupd.age import AgeError
from backupd.copies import Copies
from backupd.errors import CryptoError, IntegrityError, ObjectNotFound, StorageError
from backupd.logarchive import LogArchive
from backupd.pipeline import READ_CHUNK, DecodingReader
from backupd.storage import Storage

log = structlog.get_logger(__name__)


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
