"""One job's area of a storage: every key and listing of it (the repository contract).

Layout (DESIGN.md "Repository format"); only ``Layout`` formats these keys::

    <job>/backups/<backup_id>/manifest.json     written last; the commit point
    <job>/backups/<backup_id>/manifest.json.sig its SSH signature, put just before it (``backupd.signing``)
    <job>/backups/<backup_id>/<stream>.zst.age  one object per stream
    <job>/wal|binlog|oplog/<name>.zst.age       archived logs (``backupd.logarchive``); a name's file
                                                may go in a sub-folder its driver names (``log_path``):
    <job>/wal/<timeline>/<segment[0:16]>/<segment>.zst.age   PostgreSQL WAL, 256 segments a folder
    <job>/wal|binlog|oplog/<path>.zst.age.sig   its SSH signature over kind, name and sha256, put just before it
    <job>/state/<kind>-layout.json              no log of the kind is left in the layout before folders
    <job>/index.json                            the index of committed backups (``backupd.index``)
    <job>/pins/<backup_id>                      pins (``backupd.pins``)
    <job>/state/prune.json                      the prune journal (``backupd.prune``)
    <job>/state/last-failure.json               the newest failed run (``backupd.runstate``)
    <job>/audit/<time>-<host>-<pid>-<n>.json    audit events (``backupd.audit``)
    <job>/verify/<time>-<backup_id>.json        verification reports
    _ids/<backup_id>                            claim of a backup id, naming its job
    .backupd-check/<random>                     ``backupd check``'s round trip, deleted at once

A backup exists only once its manifest does. Directories without one are
partial leftovers of a failed or killed run; they are never listed as backups.
Which backups exist is read from the index (one object) and each manifest by key;
only a rebuild of the index and the search for partial leftovers list ``backups/``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import structlog

from backupd import index as backup_index
from backupd import lognaming, sealed, signing, sshsig
from backupd.age import AgeError
from backupd.chain import resolve_chain
from backupd.copies import open_object
from backupd.errors import (BackupNotFound, IntegrityError, ObjectExists, ObjectLocked, ObjectNotFound, StorageError,
                            UntrustedObject)
from backupd.index import IndexedBackup
from backupd.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ObjectEntry
from backupd.pipeline import DecodingReader, EncodingReader, Priority, hash_stored
from backupd.signing import Trust
from backupd.storage import Readable, Storage
from backupd.timeutil import BACKUP_ID_RE, backup_id_candidates, backup_id_sort_key

log = structlog.get_logger(__name__)

OBJECT_SUFFIX = ".zst.age"
SIGNATURE_SUFFIX = ".sig"
ID_CLAIMS_PREFIX = "_ids/"
#: The kinds of archived logs, each under its own ``<job>/<kind>/``.
LOG_KINDS = ("wal", "binlog", "oplog")
MAX_REPORT = 64 << 20
#: Seconds a Repository reuses the index it read.
INDEX_REUSE = 30.0


@dataclass(frozen=True)
class Layout:
    """Every key of one job's area of a storage; the on-storage layout is the repository contract."""

    job: str

    # backups
    @property
    def backups_prefix(self) -> str:
        return f"{self.job}/backups/"

    def backup_prefix(self, backup_id: str) -> str:
        return f"{self.backups_prefix}{backup_id}/"

    def manifest_key(self, backup_id: str) -> str:
        return f"{self.backup_prefix(backup_id)}{MANIFEST_NAME}"

    def signature_key(self, backup_id: str) -> str:
        """The manifest's signature, ``manifest.json.sig`` beside it."""
        return self.signature_beside(self.manifest_key(backup_id))

    @staticmethod
    def signature_beside(key: str) -> str:
        """Where the SSH signature of the object at ``key`` lives: ``<key>.sig`` (``backupd.signing``)."""
        return f"{key}{SIGNATURE_SUFFIX}"

    @staticmethod
    def object_name(stream: str) -> str:
        """A stream's object name inside its backup's directory (a manifest entry's ``key``)."""
        return f"{stream}{OBJECT_SUFFIX}"

    def object_key(self, backup_id: str, stream: str) -> str:
        return self.entry_key(backup_id, self.object_name(stream))

    def entry_key(self, backup_id: str, entry_key: str) -> str:
        """The key of a manifest entry (its ``key`` is relative to the backup's directory)."""
        return f"{self.backup_prefix(backup_id)}{entry_key}"

    def split_backup_key(self, key: str) -> tuple[str, str]:
        """(backup id, the rest) of a key listed under ``backups_prefix``."""
        backup_id, _, rest = key[len(self.backups_prefix):].partition("/")
        return backup_id, rest

    # archived logs
    def log_prefix(self, kind: str, under: str = "") -> str:
        """The prefix of the archived logs of ``kind`` whose names start with ``under``."""
        return f"{self.job}/{kind}/{under}"

    @staticmethod
    def log_path(kind: str, name: str) -> str:
        """A log's place under its kind's folder: the name, with the sub-folder its driver's naming gives
        (``backupd.lognaming``), e.g. ``00000001/0000000100000000/000000010000000000000003``."""
        naming = lognaming.naming(kind)
        directory, file = naming.split(name)
        return "/".join(part for part in (directory, naming.folder(file), file) if part)

    def log_key(self, kind: str, name: str) -> str:
        return f"{self.log_prefix(kind)}{self.log_path(kind, name)}{OBJECT_SUFFIX}"

    def legacy_log_key(self, kind: str, name: str) -> str | None:
        """Where the layout before log folders kept the log (``<job>/<kind>/<name>.zst.age``); None when
        that is where it goes now."""
        key = f"{self.log_prefix(kind)}{name}{OBJECT_SUFFIX}"
        return None if key == self.log_key(kind, name) else key

    def log_signature_key(self, kind: str, name: str) -> str:
        """The log object's signature, ``<object key>.sig`` beside it (``backupd.signing.sign_log``)."""
        return self.signature_beside(self.log_key(kind, name))

    def log_name(self, kind: str, key: str) -> str | None:
        """The log name of a key listed under ``log_prefix(kind)``, in either layout; None for anything
        that is not a log object."""
        if not key.endswith(OBJECT_SUFFIX) or not key.startswith(self.log_prefix(kind)):
            return None
        path = key[len(self.log_prefix(kind)):-len(OBJECT_SUFFIX)]
        head, _, file = path.rpartition("/")
        directory, _, folder = head.rpartition("/")
        if folder and lognaming.naming(kind).folder(file) == folder:
            return f"{directory}/{file}" if directory else file
        return path

    def log_list_prefixes(self, kind: str, under: str) -> list[str]:
        """Key prefixes holding every log whose name starts with ``under``, in either layout.

        ``under`` is a directory ("00000001/"), a start of a file name no longer than its folder (one
        folder: "00000001/0000000100000000"), or a whole name."""
        prefixes = [f"{self.log_prefix(kind)}{under}"]
        if not under.endswith("/"):
            foldered = self.log_prefix(kind) + self.log_path(kind, under)
            if not foldered.startswith(prefixes[0]) and not prefixes[0].startswith(foldered):
                prefixes.append(foldered)
        return prefixes

    def log_layout_key(self, kind: str) -> str:
        """Written once no log of ``kind`` is left in the layout before folders (``backupd migrate``):
        reads and pushes then stop looking there."""
        return f"{self.job}/state/{kind}-layout.json"

    # pins
    @property
    def pins_prefix(self) -> str:
        return f"{self.job}/pins/"

    def pin_key(self, backup_id: str) -> str:
        return f"{self.pins_prefix}{backup_id}"

    def pinned_id(self, key: str) -> str | None:
        """The backup id a key listed under ``pins_prefix`` pins; None when it is not one."""
        name = key[len(self.pins_prefix):]
        return name if BACKUP_ID_RE.match(name) else None

    # state
    @property
    def state_prefix(self) -> str:
        return f"{self.job}/state/"

    def journal_key(self) -> str:
        """The prune journal: the backups a prune is deleting."""
        return f"{self.state_prefix}prune.json"

    def failure_key(self) -> str:
        """The newest backup run's failure, while no later run succeeded."""
        return f"{self.state_prefix}last-failure.json"

    # audit events
    def audit_key(self, time: str, host: str | None, pid: object, unique: str) -> str:
        stamp = time.replace("-", "").replace(":", "")
        safe_host = re.sub(r"[^A-Za-z0-9.-]", "_", str(host or "host"))[:64]
        return f"{self.job}/audit/{stamp}-{safe_host}-{pid}-{unique}.json"

    # verification reports
    @property
    def reports_prefix(self) -> str:
        return f"{self.job}/verify/"

    def report_key(self, started_at: str, backup_id: str) -> str:
        return f"{self.reports_prefix}{started_at.replace(':', '').replace('-', '')}-{backup_id}.json"

    # backup id claims (storage-wide: ids are unique across jobs)
    @staticmethod
    def claim_key(backup_id: str) -> str:
        return f"{ID_CLAIMS_PREFIX}{backup_id}"

    @staticmethod
    def probe_key(token: str) -> str:
        """A storage-wide scratch key for ``backupd check``'s write, read, stat, delete round trip."""
        return f".backupd-check/{token}"

def read_bounded(handle: Readable, limit: int, key: str, what: str) -> bytes:
    """All of ``handle``, or IntegrityError naming ``key`` once it passes ``limit`` bytes."""
    chunks = []
    size = 0
    while chunk := handle.read(min(1 << 20, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise IntegrityError(f"{key}: {what} larger than the limit of {limit} bytes; not read")
    return b"".join(chunks)


@dataclass(frozen=True)
class IntegrityProblem:
    backup_id: str
    key: str
    problem: str

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}"


class Repository:
    def __init__(self, storage: Storage, job: str, *, retain_for: dt.timedelta | None = None,
                 signing_key_file: Path | None = None, trusted: Sequence[sshsig.PublicKey] = (),
                 allow_unsigned: bool = False) -> None:
        """``retain_for``: how long the retention policy guarantees to keep a new backup
        (``retention.guaranteed_keep``); streams and manifests are put with
        ``retain_until`` = now + it, so storage with Object Lock can lock them.

        ``signing_key_file``: manifests committed here are signed with it (loaded on first use).
        ``trusted``: when not empty, a manifest is used only if one of these keys signed it
        (``Settings.trusted_keys(job)``); ``allow_unsigned`` lets unsigned ones through, with a
        warning, never badly signed ones (``restore --allow-unsigned``)."""
        self.storage = storage
        self.job = job
        self.layout = Layout(job)
        self.retain_for = retain_for
        self.signing_key_file = signing_key_file
        self.trusted = tuple(trusted)
        self.allow_unsigned = allow_unsigned
        self._signing_key: sshsig.SigningKey | None = None
        self._index: backup_index.Index | None = None
        self._index_read_at = 0.0

    # -- layout ------------------------------------------------------------
    @property
    def backups_prefix(self) -> str:
        return self.layout.backups_prefix

    def backup_prefix(self, backup_id: str) -> str:
        return self.layout.backup_prefix(backup_id)

    def manifest_key(self, backup_id: str) -> str:
        return self.layout.manifest_key(backup_id)

    def object_key(self, backup_id: str, stream: str) -> str:
        return self.layout.object_key(backup_id, stream)

    claim_key = staticmethod(Layout.claim_key)

    # -- reading -----------------------------------------------------------
    def scan(self) -> tuple[list[str], list[str]]:
        """(committed backup ids, ids of directories without a manifest), oldest first."""
        committed: set[str] = set()
        seen: set[str] = set()
        for info in self.storage.list(self.backups_prefix):
            backup_id, rest = self.layout.split_backup_key(info.key)
            if not BACKUP_ID_RE.match(backup_id):
                continue
            seen.add(backup_id)
            if rest == MANIFEST_NAME:
                committed.add(backup_id)
        order = lambda ids: sorted(ids, key=backup_id_sort_key)  # noqa: E731
        return order(committed), order(seen - committed)

    def index(self, *, fresh: bool = False) -> backup_index.Index:
        """The job's index of committed backups (``backupd.index``): read once per command, again after
        ``INDEX_REUSE`` seconds (the daemon keeps a Repository for as long as a job's configuration)."""
        if self._index is None or fresh or time.monotonic() - self._index_read_at > INDEX_REUSE:
            self._index = backup_index.read(self)
            self._index_read_at = time.monotonic()
        return self._index

    def reverify_index(self) -> backup_index.Index:
        """Check the index against every manifest and correct it (``backupd.index.reverify``)."""
        self._index = backup_index.reverify(self)
        self._index_read_at = time.monotonic()
        return self._index

    def update_index(self, change: Callable[[backup_index.Index], None]) -> None:
        """Change the stored index (compare-and-swap, retried on a concurrent writer)."""
        self._index = backup_index.update(self, change)
        self._index_read_at = time.monotonic()

    def backup_ids(self) -> list[str]:
        """Committed backups, oldest first (from the index)."""
        return self.index().ids()

    def has_backup(self, backup_id: str) -> bool:
        """Whether the backup is committed (its manifest exists): one stat, no listing."""
        try:
            self.storage.stat(self.manifest_key(backup_id))
        except ObjectNotFound:
            return False
        return True

    def load_manifest(self, backup_id: str) -> Manifest:
        """The backup's manifest, checked (bounded size and depth, its own id and job; with trusted keys,
        its signature); IntegrityError otherwise (UntrustedObject when no trusted key vouches for it)."""
        manifest, trust = self.read_manifest(backup_id)
        self.require_trusted(manifest, trust)
        return manifest

    def read_manifest(self, backup_id: str) -> tuple[Manifest, Trust | None]:
        """The backup's manifest and what its signature says (None: no trusted keys, not checked).

        Does not refuse an untrusted manifest: for ``list`` and ``show``, which say what it is."""
        manifest, raw = self.read_manifest_bytes(backup_id)
        if not self.trusted:
            return manifest, None
        return manifest, signing.assess_manifest(self.storage, self.manifest_key(backup_id), raw, self.trusted)

    def read_manifest_bytes(self, backup_id: str) -> tuple[Manifest, bytes]:
        """The backup's manifest (bounded, its own id and job checked; its signature not) and its bytes."""
        key = self.manifest_key(backup_id)
        try:
            with contextlib.closing(self.storage.open(key)) as handle:
                raw = read_bounded(handle, MAX_MANIFEST_BYTES, key, "manifest")
        except ObjectNotFound:
            raise BackupNotFound(f"backup {backup_id} not found for job {self.job} in {self.storage.location}") from None
        manifest = Manifest.from_json(raw, where=key)
        if manifest.backup_id != backup_id or manifest.job != self.job:
            raise IntegrityError(f"{key}: manifest names backup {manifest.backup_id} of job {manifest.job}")
        return manifest, raw

    def read_for_index(self, backup_id: str) -> tuple[Manifest, tuple[str, str | None, str]]:
        """The manifest and (signature status, signer, problem) as the index records them
        (``backupd.index.assess``); BackupNotFound, IntegrityError as ``read_manifest_bytes``."""
        manifest, raw = self.read_manifest_bytes(backup_id)
        return manifest, backup_index.assess(self, manifest, raw)

    def require_trusted(self, manifest: Manifest, trust: Trust | None) -> None:
        """UntrustedObject unless ``trust`` lets the manifest be used (an unsigned one only with allow_unsigned)."""
        if trust is None or trust.status == "signed":
            return
        key = self.manifest_key(manifest.backup_id)
        if trust.status == "unsigned" and self.allow_unsigned:
            log.warning("using an UNSIGNED backup (--allow-unsigned): nothing proves this host's key wrote it",
                        job=self.job, backup_id=manifest.backup_id, key=key)
            return
        raise UntrustedObject(f"backup {manifest.backup_id} of job {self.job} is not trusted: {trust.problem}",
                              hint="only backups signed by a key in trusted_keys are used"
                                   + ("; `restore --allow-unsigned` reads backups from before signing"
                                      if trust.status == "unsigned" else ""))

    def entries(self) -> list[tuple[Manifest, Trust | None]]:
        """Every committed backup with a readable manifest, newest first, with what its signature says
        (None: the job has no trusted keys), from the index: untrusted ones too, for ``list`` to mark."""
        index = self.index()
        for backup_id, problem in index.unusable.items():
            log.warning("backup skipped: its manifest is unusable", job=self.job, backup_id=backup_id, error=problem)
        trusted = self.trusted
        return [(entry, entry.trust(trusted)) for entry in reversed(index.committed)]

    def scan_manifests(self) -> tuple[list[Manifest], list[tuple[str, IntegrityError]]]:
        """(usable backups newest first, [(backup id, why its manifest is unusable)]), from the index.

        The backups are the index's summaries (no object list): load a manifest by key to read its streams."""
        good: list[Manifest] = []
        index = self.index()
        bad: list[tuple[str, IntegrityError]] = [(i, IntegrityError(p)) for i, p in index.unusable.items()]
        for entry in reversed(index.committed):
            trust = entry.trust(self.trusted)
            try:  # a summary from the index (IndexedBackup): no object list
                self.require_trusted(entry, trust)
            except UntrustedObject as exc:
                bad.append((entry.backup_id, exc))
                continue
            good.append(entry)
        return good, bad

    def manifests(self) -> list[Manifest]:
        """Every committed backup that may be used, newest first (summaries from the index).

        One unreadable or lying manifest does not hide the others: it is
        logged as a warning naming it, and skipped.
        """
        good, bad = self.scan_manifests()
        for backup_id, exc in bad:
            log.warning("backup skipped: its manifest is unusable", job=self.job, backup_id=backup_id, error=str(exc))
        return good

    def usable(self) -> Sequence[Manifest]:
        """``manifests``, each summary parsed from the index only when looked at (without trusted keys: with
        them, every entry's signature status is looked at to leave the untrusted ones out)."""
        if self.trusted:
            return self.manifests()
        index = self.index()
        for backup_id, problem in index.unusable.items():
            log.warning("backup skipped: its manifest is unusable", job=self.job, backup_id=backup_id, error=problem)
        return index.usable()

    def resolve(self, backup_id: str | None) -> Manifest:
        """The named backup (only its manifest is read), or the newest one whose manifest is usable."""
        if backup_id:
            return self.load_manifest(backup_id)
        good, bad = self.scan_manifests()
        if not good and not bad:
            raise BackupNotFound(f"no backups for job {self.job} in {self.storage.location}", hint=f"run `backupd backup {self.job}`")
        for backup_id_, exc in bad:
            log.warning("backup skipped: its manifest is unusable", job=self.job, backup_id=backup_id_, error=str(exc))
        for newest in good:
            try:
                return self.load_full(newest)
            except IntegrityError as exc:
                log.warning("backup skipped: its manifest is unusable", job=self.job, backup_id=newest.backup_id,
                            error=str(exc))
        raise BackupNotFound(f"no backup of job {self.job} in {self.storage.location} has a usable manifest "
                             f"({len(good) + len(bad)} unusable)")

    def load_full(self, chosen: Manifest, *, strict: bool = False) -> Manifest:
        """The whole manifest of a backup chosen from the index (``scan_manifests``, ``manifests``), read by
        key, its signature checked again. The manifest is the truth: where it is no longer the one the index
        describes (rewritten in place), the index entry is refreshed, or with ``strict`` (prune, about to
        delete what it planned from the index) IntegrityError is raised."""
        if not isinstance(chosen, IndexedBackup):
            return chosen
        manifest = self.load_manifest(chosen.backup_id)
        try:
            backup_index.checked(self, chosen, manifest)
        except IntegrityError as exc:
            if strict:
                raise
            log.info("manifest changed since it was indexed; refreshing the index", job=self.job,
                     backup_id=chosen.backup_id, error=str(exc))
            manifest_now, status = self.read_for_index(chosen.backup_id)
            self._record(lambda index: index.put(IndexedBackup.of(manifest_now, *status)))
        return manifest

    def chain(self, manifest: Manifest) -> list[Manifest]:
        """The backups restoring ``manifest`` needs, full first, itself last: each parent's manifest read by
        key and checked like ``load_manifest``; BrokenChain naming a parent that is missing or unusable.
        Every member is a whole manifest (a driver plans from its parents' metadata), not an index summary."""
        return resolve_chain(self.load_full(manifest), self.load_manifest)

    def open_stream(self, manifest: Manifest, name: str, identities: Sequence[object], key_file: str | None = None) -> DecodingReader:
        manifest = self.load_full(manifest)  # an index summary lists no streams: the manifest does
        entry = manifest.object(name)
        key = self.layout.entry_key(manifest.backup_id, entry.key)
        return DecodingReader(
            open_object(self.storage, key, entry.stored_size, entry.sha256),
            identities,
            where=key,
            expected_size=entry.stored_size,
            expected_sha256=entry.sha256,
            expected_raw_size=entry.raw_size,
            key_file=key_file,
        )

    def check_integrity(self, manifest: Manifest) -> list[IntegrityProblem]:
        """Read every object back and compare size and sha256 with the manifest. No key needed."""
        manifest = self.load_full(manifest)  # never "no objects, all fine" from an index summary
        problems = []
        for entry in manifest.objects:
            key = self.layout.entry_key(manifest.backup_id, entry.key)
            try:
                with contextlib.closing(open_object(self.storage, key, entry.stored_size, entry.sha256)) as handle:
                    size, digest = hash_stored(handle)
            except ObjectNotFound:
                problems.append(IntegrityProblem(manifest.backup_id, key, "object is missing"))
                continue
            if size != entry.stored_size:
                problems.append(IntegrityProblem(manifest.backup_id, key, f"size {size} differs from the manifest's {entry.stored_size}"))
            elif digest != entry.sha256:
                problems.append(IntegrityProblem(manifest.backup_id, key, "sha256 differs from the manifest's (object corrupt)"))
        return problems

    # -- writing -----------------------------------------------------------
    def new_backup_id(self, moment: dt.datetime) -> str:
        """An id for a backup starting at ``moment``, claimed for this job in the whole storage."""
        taken = self.index().all_ids()  # the index (pending too): no listing; the claim decides
        for candidate in backup_id_candidates(moment):
            if candidate in taken:
                continue
            try:
                self.storage.put(self.claim_key(candidate), io.BytesIO(self.job.encode()), if_absent=True)
            except ObjectExists:
                continue  # another job of this storage has it
            return candidate
        raise AssertionError("unreachable")  # backup_id_candidates never ends

    def release_id(self, backup_id: str) -> None:
        """Drop this job's claim of ``backup_id`` (never another job's)."""
        key = self.claim_key(backup_id)
        try:
            with contextlib.closing(self.storage.open(key)) as handle:
                owner = handle.read(256).decode(errors="replace")
        except ObjectNotFound:
            return
        if owner == self.job:
            self.storage.delete(key)

    def write_stream(
        self,
        backup_id: str,
        name: str,
        source: Readable,
        recipients: Sequence[object],
        level: int,
        cancel: threading.Event | None = None,
        priority: Priority = "normal",
    ) -> ObjectEntry:
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"invalid stream name {name!r}")
        key = self.object_key(backup_id, name)
        reader = EncodingReader(source, recipients, level, cancel=cancel, priority=priority)  # type: ignore[arg-type]
        try:
            info = self.storage.put(key, reader, **self._retention())
        finally:
            reader.close()
        stats = reader.stats
        if info.size != stats.stored_size:
            raise StorageError(f"{key}: storage accepted {info.size} bytes, the pipeline produced {stats.stored_size}")
        log.debug("object stored", key=key, raw=stats.raw_size, stored=stats.stored_size)
        return ObjectEntry(name=name, key=self.layout.object_name(name), raw_size=stats.raw_size,
                           stored_size=stats.stored_size, sha256=stats.sha256)

    @property
    def signing_key(self) -> sshsig.SigningKey | None:
        """The key manifests are signed with (``signing.key_file``), loaded once; ConfigError when unreadable."""
        if self._signing_key is None and self.signing_key_file is not None:
            self._signing_key = sshsig.load_private_key(self.signing_key_file)
        return self._signing_key

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest (its signature first, with a signing key): from now on the backup exists.

        The index records the backup as pending before the manifest is put and as committed after,
        so a reader of an index written by a run killed in between stats that one manifest."""
        raw = manifest.to_json()
        key = self.manifest_key(manifest.backup_id)
        retention = self._retention()
        if self.signing_key is not None:
            signed: tuple[str, str | None, str] = ("signed", self.signing_key.public.line(), "")
        else:
            signed = ("unsigned", None, f"{self.layout.signature_key(manifest.backup_id)}: the manifest is not signed")
        entry = IndexedBackup.of(manifest, *signed, pending=True)
        self._record(lambda index: index.put(entry))
        if self.signing_key is not None:
            signing.sign_manifest(self.storage, key, raw, self.signing_key, **retention)
        try:
            self.storage.put(key, io.BytesIO(raw), if_absent=True, **retention)
        except ObjectExists:
            raise IntegrityError(f"backup {manifest.backup_id} already has a manifest; refusing to overwrite it") from None
        committed = IndexedBackup.of(manifest, *signed)
        self._record(lambda index: index.put(committed))

    def reindex(self, entry: IndexedBackup) -> None:
        """Put a backup back in the index (a prune that dropped it could not delete its manifest)."""
        self._record(lambda index: index.put(entry))

    def forget(self, backup_ids: list[str]) -> None:
        """Drop backups from the index: before a prune deletes their manifests."""
        if backup_ids:
            doomed = set(backup_ids)
            self._record(lambda index: index.drop(doomed))

    def _record(self, change: Callable[[backup_index.Index], None]) -> None:
        """Change the index; a failure to write it is logged, never fatal: the manifests are the truth."""
        try:
            self.update_index(change)
        except StorageError as exc:
            self._index = None
            log.warning("index not updated; readers rebuild it from the manifests", job=self.job, error=str(exc))

    def _retention(self) -> dict[str, Any]:
        if self.retain_for is None:
            return {}  # put() as before, for storage written before retain_until existed
        return {"retain_until": dt.datetime.now(dt.timezone.utc) + self.retain_for}

    def delete_partial(self, backup_id: str) -> int:
        count = 0
        for info in list(self.storage.list(self.backup_prefix(backup_id))):
            self.storage.delete(info.key)
            count += 1
        return count

    def abandoned(self, *, remove: bool, partial: list[str] | None = None) -> tuple[list[str], list[str]]:
        """What runs that died before their manifest left: (partial backup ids, leftover temp objects).
        ``partial``: what ``scan`` just found (a prune lists ``backups/`` once), else it is listed.

        Only with the job's lock held may ``remove`` be true: no run of this job is writing then.
        """
        if partial is None:
            _, partial = self.scan()
        removed = []
        for backup_id in partial:
            if remove:
                try:
                    self.delete_partial(backup_id)
                except ObjectLocked:
                    continue  # Object Lock still holds some of it: retention removes it once the lock ends
                self.release_id(backup_id)
            removed.append(backup_id)
        return removed, self.storage.sweep(self.backups_prefix, remove=remove)

    # -- verification reports ---------------------------------------------
    def write_report(self, started_at: str, backup_id: str, report: dict[str, Any]) -> str:
        """Store a verification report (named for when it started and its backup); return its key."""
        key = self.layout.report_key(started_at, backup_id)
        self.storage.put(key, io.BytesIO(json.dumps(report, indent=2).encode() + b"\n"))
        return key

    def read_report(self, key: str, identities: Sequence[object] = ()) -> dict[str, Any]:
        """A stored verification report; its sealed details opened when ``identities`` can.

        IntegrityError when it is not a JSON object or its sealed part cannot be
        opened with the identities given.
        """
        with contextlib.closing(self.storage.open(key)) as handle:
            raw = read_bounded(handle, MAX_REPORT, key, "verification report")
        try:
            report = json.loads(raw)
        except ValueError as exc:
            raise IntegrityError(f"{key}: verification report is not JSON ({exc})") from None
        if not isinstance(report, dict):
            raise IntegrityError(f"{key}: verification report is not a JSON object")
        try:
            return sealed.unseal(report, identities)
        except (AgeError, ValueError) as exc:
            raise IntegrityError(f"{key}: the report's sealed details cannot be opened ({exc})") from None

    def iter_reports(self) -> Iterator[str]:
        for info in self.storage.list(self.layout.reports_prefix):
            yield info.key
