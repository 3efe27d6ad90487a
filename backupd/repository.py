"""One job's area of a storage: where objects and manifests live.

Layout (DESIGN.md)::

    <job>/backups/<backup_id>/manifest.json     written last; the commit point
    <job>/backups/<backup_id>/<stream>.zst.age  one object per stream
    <job>/verify/<timestamp>.json               verification reports
    _ids/<backup_id>                            claim of a backup id, naming its job

A backup exists only once its manifest does. Directories without one are
partial leftovers of a failed or killed run; they are never listed as backups.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import structlog

from backupd import sealed
from backupd.age import AgeError
from backupd.errors import BackupNotFound, IntegrityError, ObjectExists, ObjectLocked, ObjectNotFound, StorageError
from backupd.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ObjectEntry
from backupd.pipeline import DecodingReader, EncodingReader, Priority, hash_stored
from backupd.storage import Readable, Storage
from backupd.timeutil import BACKUP_ID_RE, backup_id_candidates, backup_id_sort_key

log = structlog.get_logger(__name__)

OBJECT_SUFFIX = ".zst.age"
ID_CLAIMS_PREFIX = "_ids/"
MAX_REPORT = 64 << 20


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
    def __init__(self, storage: Storage, job: str, *, retain_for: dt.timedelta | None = None) -> None:
        """``retain_for``: how long the retention policy guarantees to keep a new backup
        (``retention.guaranteed_keep``); streams and manifests are put with
        ``retain_until`` = now + it, so storage with Object Lock can lock them."""
        self.storage = storage
        self.job = job
        self.retain_for = retain_for

    # -- layout ------------------------------------------------------------
    @property
    def backups_prefix(self) -> str:
        return f"{self.job}/backups/"

    def backup_prefix(self, backup_id: str) -> str:
        return f"{self.backups_prefix}{backup_id}/"

    def manifest_key(self, backup_id: str) -> str:
        return f"{self.backup_prefix(backup_id)}{MANIFEST_NAME}"

    def object_key(self, backup_id: str, stream: str) -> str:
        return f"{self.backup_prefix(backup_id)}{stream}{OBJECT_SUFFIX}"

    # -- reading -----------------------------------------------------------
    def scan(self) -> tuple[list[str], list[str]]:
        """(committed backup ids, ids of directories without a manifest), oldest first."""
        committed: set[str] = set()
        seen: set[str] = set()
        for info in self.storage.list(self.backups_prefix):
            backup_id, _, rest = info.key[len(self.backups_prefix):].partition("/")
            if not BACKUP_ID_RE.match(backup_id):
                continue
            seen.add(backup_id)
            if rest == MANIFEST_NAME:
                committed.add(backup_id)
        order = lambda ids: sorted(ids, key=backup_id_sort_key)  # noqa: E731
        return order(committed), order(seen - committed)

    def backup_ids(self) -> list[str]:
        return self.scan()[0]

    def load_manifest(self, backup_id: str) -> Manifest:
        """The backup's manifest, checked (bounded size and depth, its own id and job); IntegrityError otherwise."""
        key = self.manifest_key(backup_id)
        try:
            with contextlib.closing(self.storage.open(key)) as handle:
                raw = read_bounded(handle, MAX_MANIFEST_BYTES, key, "manifest")
        except ObjectNotFound:
            raise BackupNotFound(f"backup {backup_id} not found for job {self.job} in {self.storage.location}") from None
        manifest = Manifest.from_json(raw, where=key)
        if manifest.backup_id != backup_id or manifest.job != self.job:
            raise IntegrityError(f"{key}: manifest names backup {manifest.backup_id} of job {manifest.job}")
        return manifest

    def scan_manifests(self) -> tuple[list[Manifest], list[tuple[str, IntegrityError]]]:
        """(readable manifests newest first, [(backup id, why its manifest is unusable)])."""
        good: list[Manifest] = []
        bad: list[tuple[str, IntegrityError]] = []
        for backup_id in reversed(self.backup_ids()):
            try:
                good.append(self.load_manifest(backup_id))
            except BackupNotFound:
                continue  # deleted since the listing (a prune)
            except IntegrityError as exc:
                bad.append((backup_id, exc))
        return good, bad

    def manifests(self) -> list[Manifest]:
        """Every committed backup whose manifest is usable, newest first.

        One unreadable or lying manifest does not hide the others: it is
        logged as a warning naming it, and skipped.
        """
        good, bad = self.scan_manifests()
        for backup_id, exc in bad:
            log.warning("backup skipped: its manifest is unusable", job=self.job, backup_id=backup_id, error=str(exc))
        return good

    def resolve(self, backup_id: str | None) -> Manifest:
        """The named backup (only its manifest is read), or the newest one whose manifest is usable."""
        if backup_id:
            return self.load_manifest(backup_id)
        ids = self.backup_ids()
        if not ids:
            raise BackupNotFound(f"no backups for job {self.job} in {self.storage.location}", hint=f"run `backupd backup {self.job}`")
        for newest in reversed(ids):
            try:
                return self.load_manifest(newest)
            except IntegrityError as exc:
                log.warning("backup skipped: its manifest is unusable", job=self.job, backup_id=newest, error=str(exc))
        raise BackupNotFound(f"no backup of job {self.job} in {self.storage.location} has a usable manifest "
                             f"({len(ids)} unusable)")

    def open_stream(self, manifest: Manifest, name: str, identities: Sequence[object], key_file: str | None = None) -> DecodingReader:
        entry = manifest.object(name)
        key = f"{self.backup_prefix(manifest.backup_id)}{entry.key}"
        return DecodingReader(
            self.storage.open(key),
            identities,
            where=key,
            expected_size=entry.stored_size,
            expected_sha256=entry.sha256,
            expected_raw_size=entry.raw_size,
            key_file=key_file,
        )

    def check_integrity(self, manifest: Manifest) -> list[IntegrityProblem]:
        """Read every object back and compare size and sha256 with the manifest. No key needed."""
        problems = []
        for entry in manifest.objects:
            key = f"{self.backup_prefix(manifest.backup_id)}{entry.key}"
            try:
                with contextlib.closing(self.storage.open(key)) as handle:
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
        committed, partial = self.scan()
        taken = set(committed) | set(partial)
        for candidate in backup_id_candidates(moment):
            if candidate in taken:
                continue
            try:
                self.storage.put(self.claim_key(candidate), io.BytesIO(self.job.encode()), if_absent=True)
            except ObjectExists:
                continue  # another job of this storage has it
            return candidate
        raise AssertionError("unreachable")  # backup_id_candidates never ends

    @staticmethod
    def claim_key(backup_id: str) -> str:
        return f"{ID_CLAIMS_PREFIX}{backup_id}"

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
        return ObjectEntry(name=name, key=f"{name}{OBJECT_SUFFIX}", raw_size=stats.raw_size,
                           stored_size=stats.stored_size, sha256=stats.sha256)

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest: from now on the backup exists."""
        try:
            self.storage.put(self.manifest_key(manifest.backup_id), io.BytesIO(manifest.to_json()), if_absent=True,
                             **self._retention())
        except ObjectExists:
            raise IntegrityError(f"backup {manifest.backup_id} already has a manifest; refusing to overwrite it") from None

    def _retention(self) -> dict[str, dt.datetime]:
        if self.retain_for is None:
            return {}  # put() as before, for storage written before retain_until existed
        return {"retain_until": dt.datetime.now(dt.timezone.utc) + self.retain_for}

    def delete_partial(self, backup_id: str) -> int:
        count = 0
        for info in list(self.storage.list(self.backup_prefix(backup_id))):
            self.storage.delete(info.key)
            count += 1
        return count

    def abandoned(self, *, remove: bool) -> tuple[list[str], list[str]]:
        """What runs that died before their manifest left: (partial backup ids, leftover temp objects).

        Only with the job's lock held may ``remove`` be true: no run of this job is writing then.
        """
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
    def write_report(self, name: str, report: dict[str, Any]) -> str:
        key = f"{self.job}/verify/{name}.json"
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
        for info in self.storage.list(f"{self.job}/verify/"):
            yield info.key
