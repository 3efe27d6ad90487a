"""Moving a job's repository from an older layout to the current one (``backupd migrate JOB``).

Today that is the archived logs from the layout before log folders
(``<job>/wal/<timeline>/<segment>.zst.age``) to the folders their driver names
(``<job>/wal/<timeline>/<segment[0:16]>/<segment>.zst.age``, ``backupd.lognaming``). Reads
find an object in either layout meanwhile (``backupd.logarchive``).

Each object moves on its own: its signature is copied first (it covers the log's name, not
its key, so it stays valid), then the object, whose stored bytes are read back and compared
(sha256) with what was read, and only then is the old one deleted. A move cut short leaves
both copies, which the next run finds identical and finishes, so the command is safe to
interrupt and to run again. Once no log of a kind is left in the old layout,
``Layout.log_layout_key`` is written and reads stop looking there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
from dataclasses import dataclass, field
from typing import Sequence

import structlog

from backupd import lognaming, signing
from backupd.errors import ObjectExists, ObjectLocked, ObjectNotFound
from backupd.pipeline import READ_CHUNK, hash_stored
from backupd.repository import Layout
from backupd.storage import Readable, Storage

log = structlog.get_logger(__name__)


@dataclass
class MigrationResult:
    job: str
    dry_run: bool
    moved: list[str] = field(default_factory=list)  #: "kind/name" of every log moved (or, dry run, to move)
    #: logs left in the old layout, with why ("kind/name: ...")
    problems: list[str] = field(default_factory=list)
    #: kinds whose logs are all in the current layout now (their layout marker written)
    done: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"job": self.job, "dry_run": self.dry_run, "moved": len(self.moved), "problems": self.problems,
                "done": self.done}


class _Hashing:
    """A reader that hashes what passes through it."""

    def __init__(self, source: Readable) -> None:
        self.source = source
        self.digest = hashlib.sha256()

    def read(self, size: int = -1, /) -> bytes:
        chunk = self.source.read(size if size is not None and size > 0 else READ_CHUNK)
        self.digest.update(chunk)
        return chunk


def kinds_of(driver: str) -> list[str]:
    """The log kinds a driver archives in folders (those a repository of an older layout holds flat)."""
    from backupd import plugins

    return [naming.kind for naming in plugins.driver_descriptor(driver).log_namings if naming.foldered]


def migrate(storage: Storage, job: str, kinds: Sequence[str], *, dry_run: bool = False,
            if_needed: bool = False) -> MigrationResult:
    """Move every log of ``kinds`` (``kinds_of`` the job's driver) of ``job`` still in the layout before folders;
    see the module's docstring. ``if_needed`` (the daemon at start): skip a kind whose layout marker says it
    was done."""
    layout = Layout(job)
    result = MigrationResult(job, dry_run)
    for kind in kinds:
        if not lognaming.naming(kind).foldered or (if_needed and _exists(storage, layout.log_layout_key(kind))):
            continue
        left = 0
        for info in list(storage.list(layout.log_prefix(kind))):
            name = layout.log_name(kind, info.key)
            if name is None or layout.legacy_log_key(kind, name) != info.key:
                continue  # not a log object, or already where it goes
            if dry_run:
                result.moved.append(f"{kind}/{name}")
                continue
            try:
                _move(storage, info.key, layout.log_key(kind, name))
            except _Refused as exc:
                left += 1
                result.problems.append(f"{kind}/{name}: {exc}")
                log.warning("log not moved to the current layout", job=job, log=f"{kind}/{name}", error=str(exc))
                continue
            result.moved.append(f"{kind}/{name}")
        if dry_run or left:
            continue
        storage.put(layout.log_layout_key(kind), io.BytesIO(b'{"logs": "foldered"}\n'))
        result.done.append(kind)
    if result.moved and not dry_run:
        log.info("logs moved to the current layout", job=job, moved=len(result.moved), left=len(result.problems))
    return result


def migrate_in_background(repositories: list[tuple[str, Storage, list[str]]]) -> threading.Thread:
    """The daemon's start: each job's repositories (job, storage, log kinds) migrated once, in a thread of
    its own (errors logged)."""
    def run() -> None:
        for job, storage, kinds in repositories:
            try:
                result = migrate(storage, job, kinds, if_needed=True)
            except Exception as exc:  # a storage outage: reads still find the old layout; the next start tries again
                log.error("migrating the repository to the current layout failed", job=job, error=str(exc))
                continue
            finally:
                storage.close()
            if result.moved or result.problems:
                log.info("repository migrated to the current layout", job=job, moved=len(result.moved),
                         problems=result.problems)

    thread = threading.Thread(target=run, name="migrate", daemon=True)
    thread.start()
    return thread


class _Refused(Exception):
    pass


def _move(storage: Storage, old: str, new: str) -> None:
    source = storage.stat(old)
    old_sig, new_sig = signing.signature_key(old), signing.signature_key(new)
    signed = _exists(storage, old_sig)
    try:
        existing = storage.stat(new)
    except ObjectNotFound:
        existing = None
    if existing is not None:  # a move cut short, or pushed again since: the same bytes finish the move
        if (existing.metadata or {}).get("sha256") != (source.metadata or {}).get("sha256") or \
                _stored_sha256(storage, new) != _stored_sha256(storage, old):
            raise _Refused(f"{new} holds other content than {old}; both kept")
    else:
        if signed:
            _copy(storage, old_sig, new_sig, if_absent=False)
        try:
            digest = _copy(storage, old, new, metadata=dict(source.metadata or {}), if_absent=True)
        except ObjectExists:
            raise _Refused(f"{new} was written while moving {old}; run the migration again") from None
        if _stored_sha256(storage, new) != digest:
            storage.delete(new)
            raise _Refused(f"{new}: the copy's sha256 differs from {old}'s; the old object kept")
    if signed and not _exists(storage, new_sig):
        _copy(storage, old_sig, new_sig, if_absent=False)
    try:
        storage.delete(old)
        storage.delete(old_sig)
    except ObjectLocked as exc:
        raise _Refused(f"{old}: copied, but storage keeps it under Object Lock ({exc})") from None


def _copy(storage: Storage, old: str, new: str, *, metadata: dict[str, str] | None = None,
          if_absent: bool) -> str:
    """Copy one object; the sha256 of the bytes read."""
    with contextlib.closing(storage.open(old)) as handle:
        reader = _Hashing(handle)
        storage.put(new, reader, if_absent=if_absent, metadata=metadata)
    return reader.digest.hexdigest()


def _stored_sha256(storage: Storage, key: str) -> str:
    with contextlib.closing(storage.open(key)) as handle:
        return hash_stored(handle)[1]


def _exists(storage: Storage, key: str) -> bool:
    try:
        storage.stat(key)
    except ObjectNotFound:
        return False
    return True
