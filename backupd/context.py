"""Wiring shared by every command: settings -> storage -> repository -> driver -> keys."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

from backupd import age, plugins
from backupd.copies import Copies
from backupd.driver import Driver, DriverContext, LogReach
from backupd.errors import ConfigError, CryptoError
from backupd.copyreads import CopiesLogArchive, CopiesRepository
from backupd.logarchive import LogArchive, LogObject
from backupd.manifest import Manifest, PitrStart
from backupd.repository import Repository
from backupd.retention import guaranteed_keep
from backupd.sandbox import SandboxPolicy
from backupd.settings import JobSettings, Settings
from backupd.storage import Storage
from backupd.timeutil import utcnow


def open_storage(settings: Settings, name: str) -> Storage:
    options: Any = settings.storage_options(name)
    backend: Any = plugins.storage_class(options.type)  # a backend's constructor takes its options model
    return backend(options)


@dataclass
class JobContext:
    """Everything one command needs to act on one job."""

    settings: Settings
    name: str
    #: Unsigned backups may be read (with a warning), badly signed ones never (``restore --allow-unsigned``).
    allow_unsigned: bool = False
    #: One of the job's repositories alone, with its own retention (``for_storage``); None: all of them.
    only_storage: str | None = None
    #: Inside ``one_listing``: each log kind's archive as listed once, shared by every continuity check.
    _listings: dict[str, list[LogObject]] | None = field(default=None, repr=False)

    @property
    def job(self) -> JobSettings:
        job = self.settings.job(self.name)
        if self.only_storage is None:
            return job
        return job.model_copy(update={"storage": self.only_storage, "min_copies": 1,
                                      "retention": job.retention_for(self.only_storage)})

    def for_storage(self, storage: str) -> "JobContext":
        """The same job on one of its repositories alone (per-repository retention, copy, catch-up)."""
        if storage not in self.settings.job(self.name).storages:
            raise ConfigError(f"job {self.name} has no storage {storage!r} "
                              f"(its storages: {', '.join(self.settings.job(self.name).storages)})")
        return JobContext(self.settings, self.name, allow_unsigned=self.allow_unsigned, only_storage=storage)

    def per_storage(self) -> list["JobContext"]:
        """One context per repository of the job (just this one when it has one)."""
        if len(self.job.storages) == 1:
            return [self]
        return [self.for_storage(name) for name in self.job.storages]

    @property
    def state_dir(self) -> Path:
        return self.settings.daemon.state_dir

    @functools.cached_property
    def storage(self) -> Storage:
        names = self.job.storages
        if len(names) == 1:
            return open_storage(self.settings, names[0])
        return Copies({name: open_storage(self.settings, name) for name in names}, self.job.min_copies)

    @functools.cached_property
    def repository(self) -> Repository:
        repository = CopiesRepository if isinstance(self.storage, Copies) else Repository
        return repository(self.storage, self.name, retain_for=guaranteed_keep(self.job.retention, "backup"),
                          signing_key_file=self.settings.signing.key_file,
                          trusted=self.settings.trusted_keys(self.name), allow_unsigned=self.allow_unsigned)

    @functools.cached_property
    def driver(self) -> Driver:
        cls = plugins.driver_class(self.job.driver)
        context = DriverContext(
            job=self.name,
            settings=self.job,
            options=self.settings.driver_options(self.name),
            state_dir=self.state_dir,
            logs=self.log_archive,
            config_path=self.settings.source,
            open_log=self.open_log,
            sandbox=self.sandbox_policy(),
            manifests=self.manifests,
            open_stream=self.open_stream,
        )
        return cls(context)

    def manifests(self) -> list[Manifest]:
        """Every usable backup of the job, newest first (an unusable manifest is skipped with a warning)."""
        return self.repository.manifests()

    def sandbox_policy(self) -> SandboxPolicy:
        """The job's sandbox mode and memory limit; every secret and state path of this configuration stays hidden."""
        hidden = [self.state_dir]
        if self.settings.source is not None:
            hidden.append(Path(self.settings.source).resolve().parent)
        if self.settings.encryption.identity_file is not None:
            hidden.append(self.settings.encryption.identity_file)
        if self.settings.signing.key_file is not None:
            hidden.append(self.settings.signing.key_file)
        for name in self.settings.jobs:
            secret = getattr(self.settings.driver_options(name), "password_file", None)
            if secret is not None:
                hidden.append(Path(secret))
        return SandboxPolicy(self.job.verify.sandbox, tuple(Path(os.path.abspath(p)) for p in hidden),
                             self.job.verify.memory_limit)

    @contextlib.contextmanager
    def one_listing(self) -> Iterator[None]:
        """A command that checks the logs of many backups (verify, the integrity rotation, prune): inside,
        ``log_reaches`` lists each log archive once, not once per backup (a prune's deletion drops it)."""
        outer = self._listings
        if outer is None:
            self._listings = {}
        try:
            yield
        finally:
            if outer is None:
                self._listings = None

    def listed_archive(self, kind: str) -> LogArchive:
        """The job's archive of ``kind`` for listing and deleting (no key): listed once inside ``one_listing``."""
        archive = LogArchive(self.storage, self.name, kind, trusted=self.settings.trusted_keys(self.name),  # type: ignore[arg-type]
                             allow_unsigned=self.allow_unsigned)
        archive.listings = self._listings
        return archive

    def log_reaches(self, manifests: list[Manifest], identities: Sequence[object] = (),
                    key_file: str | None = None, *, record: bool = False) -> dict[str, LogReach | None]:
        """How far each backup's archived logs reach (to the first gap), from the listing alone: no key needed
        (with ``identities``, what the driver can read too, e.g. PostgreSQL's timeline histories).
        ``record``: the listing and the reaches go in the index's log summary (``backupd.reaches.record``)."""
        from backupd.restore import RepositorySource

        with self.one_listing():
            taken_at = utcnow()
            found = {m.backup_id: self.driver.log_reach(RepositorySource(self.repository, m, identities, key_file,
                                                                          listings=self._listings, summary_ok=True))
                     for m in manifests if PitrStart.recorded(m)}
            if record:
                self.record_reaches(manifests, found, taken_at)
            return found

    def record_reaches(self, manifests: list[Manifest], reaches: dict[str, LogReach | None],
                       taken_at: dt.datetime) -> None:
        """Inside ``one_listing``, after ``log_reaches`` of ``manifests``: the index's log summary records the
        listing and these reaches (``backupd.reaches.record``)."""
        from backupd import reaches as recorded

        recorded.record(self, manifests, reaches, self._listings or {}, taken_at)

    def open_stream(self, manifest: Manifest, name: str) -> BinaryIO:
        from backupd.restore import RepositorySource

        return RepositorySource(self.repository, manifest, self.identities, str(self.identity_file)).open(name)

    def open_log(self, kind: str, name: str) -> BinaryIO:
        return self.log_archive(kind).open(name, self.identities, str(self.identity_file))  # type: ignore[return-value]

    def log_archive(self, kind: str) -> LogArchive:
        """The job's WAL/binlog/oplog archive; pushing needs only the public recipients."""
        archive = CopiesLogArchive if isinstance(self.storage, Copies) else LogArchive
        return archive(self.storage, self.name, kind, self.recipients, self.job.compression_level,  # type: ignore[arg-type]
                          retain_for=guaranteed_keep(self.job.retention, "log"),
                          signing_key_file=self.settings.signing.key_file,
                          trusted=self.settings.trusted_keys(self.name), allow_unsigned=self.allow_unsigned)

    @functools.cached_property
    def recipients(self) -> list[age.X25519Recipient]:
        texts = self.settings.encryption.require_recipients("writing a backup or an archived log")
        return [age.parse_recipient(text) for text in texts]

    @property
    def identity_file(self) -> Path:
        path = self.settings.encryption.identity_file
        if path is None:
            raise ConfigError(
                "encryption.identity_file is not set: restoring and verifying need the private key",
                hint="set encryption.identity_file or BACKUPD_ENCRYPTION__IDENTITY_FILE",
            )
        return path

    @functools.cached_property
    def identities(self) -> list[age.X25519Identity]:
        path = self.identity_file
        try:
            identities = age.load_identities(path)
        except FileNotFoundError:
            raise CryptoError(f"identity file {path}: not found") from None
        except PermissionError:
            raise CryptoError(f"identity file {path}: permission denied") from None
        except age.AgeError as exc:
            raise CryptoError(f"identity file {path}: {exc}") from None
        if not identities:
            raise CryptoError(f"identity file {path}: contains no identity")
        return identities

    def close(self) -> None:
        if "storage" in self.__dict__:
            self.storage.close()
