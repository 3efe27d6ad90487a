"""What one repository of a job lacks that another holds, and copying it across (``backupd copy``, the daemon).

Only backup data moves: committed backups (their streams, then ``manifest.json.sig``, then
``manifest.json`` last, so a half-copied backup does not exist in the target) and archived
logs (a log's ``.sig`` before it). Partial backups, partial WAL (``.partial``), the derived
index, state, pins, audit events and reports stay where they are.

Each object is copied byte for byte with its metadata (a log's plaintext digest) and with
the target's own ``retain_until``; a backup stream is checked against its manifest's size
and sha256 as it streams, and a copy that does not match is aborted (nothing is left in the
target) and taken from the next source instead. Oldest first; a run that stops half-way is
resumed by the next, which copies only what is still missing, and a run with nothing missing
copies nothing.

A repository gets only what its own retention policy keeps (``retention_by_storage``): the
policy is planned (``backupd.retention.plan``, pure) over every backup and log the job's
repositories hold together, so what a short local policy pruned is not brought back from a
long offsite one, and is not counted as missing either.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import structlog

from backupd import progress
from backupd.errors import IntegrityError, ObjectExists, ObjectNotFound, StorageError
from backupd.context import JobContext
from backupd.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
from backupd.pins import Pins
from backupd.prune import backup_item
from backupd.repository import LOG_KINDS, Layout, read_bounded
from backupd.retention import LogItem
from backupd.retention import plan as retention_plan
from backupd.settings import RetentionSettings
from backupd.storage import ObjectInfo, Readable, Storage
from backupd.timeutil import BACKUP_ID_RE, backup_id_sort_key, format_timestamp

log = structlog.get_logger(__name__)

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


@dataclass
class Unit:
    """Objects copied together, in order (a backup's commit markers last); ``time`` orders units oldest first."""

    label: str
    time: dt.datetime
    keys: list[str]
    backup_id: str | None = None  # a backup: its manifest gives each stream's size and sha256
    sizes: dict[str, int] = field(default_factory=dict)
    log: tuple[str, str] | None = None  # a log: (kind, name)


@dataclass
class Listing:
    """One repository's backup data for a job: every key with its info."""

    objects: dict[str, ObjectInfo]

    @classmethod
    def read(cls, storage: Storage, job: str) -> "Listing":
        layout = Layout(job)
        objects: dict[str, ObjectInfo] = {}
        for prefix in (layout.backups_prefix, *(layout.log_prefix(kind) for kind in LOG_KINDS)):
            for info in storage.list(prefix):
                objects[info.key] = info
        return cls(objects)

    def committed(self, layout: Layout) -> list[str]:
        ids = {layout.split_backup_key(key)[0] for key in self.objects
               if key.startswith(layout.backups_prefix) and key.endswith("/" + MANIFEST_NAME)}
        return sorted((i for i in ids if BACKUP_ID_RE.match(i)), key=backup_id_sort_key)


def backup_time(backup_id: str) -> dt.datetime:
    return dt.datetime.strptime(backup_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)


def units(source: Listing, layout: Layout) -> list[Unit]:
    """Everything ``source`` holds as copy units, oldest first."""
    found: list[Unit] = []
    for backup_id in source.committed(layout):
        prefix = layout.backup_prefix(backup_id)
        manifest = layout.manifest_key(backup_id)
        signature = Layout.signature_beside(manifest)
        keys = sorted(key for key in source.objects if key.startswith(prefix) and key not in (manifest, signature))
        keys += [key for key in (signature, manifest) if key in source.objects]
        found.append(Unit(f"backup {backup_id}", backup_time(backup_id), keys, backup_id,
                          {key: source.objects[key].size for key in keys}))
    for kind in LOG_KINDS:
        for key, info in source.objects.items():
            name = layout.log_name(kind, key) if key.startswith(layout.log_prefix(kind)) else None
            if name is None or ".partial" in name:
                continue
            keys = [Layout.signature_beside(key)] if Layout.signature_beside(key) in source.objects else []
            found.append(Unit(f"log {key}", info.modified or _EPOCH, [*keys, key],
                              sizes={k: source.objects[k].size for k in [*keys, key]}, log=(kind, name)))
    found.sort(key=lambda unit: (unit.time, unit.label))
    return found


Keep = Callable[[Unit], bool]


def keep_all(unit: Unit) -> bool:
    return True


def lacking(source: Listing, target: Listing, layout: Layout, keep: Keep = keep_all) -> list[Unit]:
    """The units (narrowed to their missing keys) ``target`` lacks and keeps by its policy, oldest first."""
    missing = []
    for unit in units(source, layout):
        keys = [key for key in unit.keys if key not in target.objects]
        if keys and keep(unit):
            missing.append(Unit(unit.label, unit.time, keys, unit.backup_id, unit.sizes, unit.log))
    return missing


class Manifests:
    """Manifests by backup id, read once from whichever repository has a readable one (they never change)."""

    def __init__(self, job: str) -> None:
        self.layout = Layout(job)
        self._cache: dict[str, Manifest | None] = {}

    def get(self, backup_id: str, storages: Iterable[Storage]) -> Manifest | None:
        if backup_id not in self._cache:
            self._cache[backup_id] = None
            key = self.layout.manifest_key(backup_id)
            for storage in storages:
                try:
                    with contextlib.closing(storage.open(key)) as handle:
                        raw = read_bounded(handle, MAX_MANIFEST_BYTES, key, "manifest")
                    self._cache[backup_id] = Manifest.from_json(raw, where=key)
                    break
                except (StorageError, IntegrityError):
                    continue
        return self._cache[backup_id]


def policy_keeps(listings: Iterable[Listing], layout: Layout, policy: RetentionSettings, manifests: Manifests,
                 storages: Iterable[Storage], *, pinned: Iterable[str] = (), tz: str = "UTC",
                 now: dt.datetime | None = None) -> Keep:
    """What a repository with ``policy`` keeps of everything the job's repositories hold together."""
    if policy.is_empty():
        return keep_all
    storages = list(storages)
    everything: dict[str, Unit] = {}
    for listing in listings:
        for unit in units(listing, layout):
            everything.setdefault(unit.label, unit)
    warnings: list[str] = []
    pins = set(pinned)
    backups = []
    for unit in everything.values():
        manifest = manifests.get(unit.backup_id, storages) if unit.backup_id else None
        if manifest is not None:
            backups.append(backup_item(manifest, manifest.backup_id in pins, warnings))
    logs = [LogItem(unit.log[0], unit.log[1], unit.time) for unit in everything.values() if unit.log]
    decided = retention_plan(backups, logs, policy, now or dt.datetime.now(dt.timezone.utc), tz)
    kept_backups = set(decided.kept_backups())
    kept_logs = {(d.kind, d.name) for d in decided.logs if d.keep}
    return lambda unit: unit.backup_id in kept_backups if unit.backup_id else unit.log in kept_logs


@dataclass
class Behind:
    objects: int = 0
    oldest: dt.datetime | None = None

    def seconds(self, now: dt.datetime) -> float:
        return max(0.0, (now - self.oldest).total_seconds()) if self.oldest else 0.0


def behind(listings: dict[str, Listing], layout: Layout, keeps: dict[str, Keep]) -> dict[str, Behind]:
    """Per repository: how many objects the others hold that it lacks (and keeps), and the oldest one's time."""
    result = {}
    for name, target in listings.items():
        missing: dict[str, dt.datetime] = {}
        for other, source in listings.items():
            if other == name:
                continue
            for unit in lacking(source, target, layout, keeps.get(name, keep_all)):
                for key in unit.keys:
                    missing.setdefault(key, unit.time)
        result[name] = Behind(len(missing), min(missing.values(), default=None))
    return result


class _Checked:
    """A stored object as it streams, counted and hashed; at its end, IntegrityError unless it is what
    the manifest says (so the target's put is aborted and leaves nothing)."""

    def __init__(self, handle: Readable, key: str, size: int | None, sha256: str | None) -> None:
        self._handle, self._key, self._size, self._sha256 = handle, key, size, sha256
        self._hash = hashlib.sha256()
        self._count = 0
        #: Set when the failure is the source's (the copy then moves on to the next source).
        self.source_failed = False

    def read(self, size: int = -1, /) -> bytes:
        try:
            data = self._handle.read(size)
        except StorageError:
            self.source_failed = True
            raise
        self._hash.update(data)
        self._count += len(data)
        progress.advance(len(data))
        if not data and size:
            if self._size is not None and self._count != self._size:
                self.source_failed = True
                raise IntegrityError(f"{self._key}: {self._count} bytes read, {self._size} expected")
            if self._sha256 is not None and self._hash.hexdigest() != self._sha256:
                self.source_failed = True
                raise IntegrityError(f"{self._key}: sha256 differs from the manifest's (object corrupt)")
        return data


@dataclass
class CopyResult:
    copied: list[str] = field(default_factory=list)
    bytes: int = 0
    failed: list[str] = field(default_factory=list)  # "key: why", nothing good to copy from


RetainUntil = Callable[[], "dt.datetime | None"]


class Copier:
    """Copies what ``target`` lacks from ``sources`` (tried in order, object by object)."""

    def __init__(self, job: str, target: Storage, sources: dict[str, Storage],
                 retain_until: RetainUntil = lambda: None, keep: Callable[[list[Listing]], Keep] | None = None,
                 manifests: Manifests | None = None) -> None:
        """``keep``: given every listing (the target's first), what the target's policy keeps."""
        self.layout = Layout(job)
        self.target = target
        self.sources = sources
        self.retain_until = retain_until
        self.keep = keep
        self.manifests = manifests or Manifests(job)

    def plan(self) -> list[Unit]:
        target = Listing.read(self.target, self.layout.job)
        sources = [Listing.read(source, self.layout.job) for source in self.sources.values()]
        keep = self.keep([target, *sources]) if self.keep is not None else keep_all
        seen: set[str] = set()
        plan: list[Unit] = []
        for source in sources:
            for unit in lacking(source, target, self.layout, keep):
                keys = [key for key in unit.keys if key not in seen]
                seen.update(keys)
                if keys:
                    plan.append(Unit(unit.label, unit.time, keys, unit.backup_id, unit.sizes, unit.log))
        plan.sort(key=lambda unit: (unit.time, unit.label))
        return plan

    def run(self, plan: Iterable[Unit] | None = None) -> CopyResult:
        plan = list(self.plan() if plan is None else plan)
        progress.expect(sum(unit.sizes.get(key, 0) for unit in plan for key in unit.keys))
        result = CopyResult()
        for unit in plan:
            expected: dict[str, tuple[int, str]] = {}
            keys = unit.keys
            if unit.backup_id:
                expected = self._expected(unit)
                if not expected:
                    result.failed.append(f"{self.layout.manifest_key(unit.backup_id)}: no readable manifest")
                    continue
                # every stream the manifest names, whichever source lists it, before the commit markers
                keys = [*[key for key in expected if not self._has(key)], *[k for k in keys if k not in expected]]
            for key in keys:
                if unit.backup_id and key not in expected and (gone := [k for k in expected if not self._has(k)]):
                    vanished = f"{len(gone)} stream(s) vanished from the target before its manifest (a prune?)"
                    result.failed.append(f"{key}: {vanished}")
                    log.error("commit marker not copied", key=key, problem=vanished)
                    break
                why = self._copy(key, expected.get(key), result)
                if why is not None:
                    result.failed.append(f"{key}: {why}")
                    log.error("object not copied: no repository holds a good copy", key=key, problem=why)
                    break  # the unit's commit marker must not follow a missing stream
        return result

    def _has(self, key: str) -> bool:
        try:
            self.target.stat(key)
        except ObjectNotFound:
            return False
        return True

    def _expected(self, unit: Unit) -> dict[str, tuple[int, str]]:
        """Each stream's (size, sha256) from the backup's manifest (read from the first source that has one)."""
        assert unit.backup_id is not None
        manifest = self.manifests.get(unit.backup_id, [*self.sources.values(), self.target])
        if manifest is None:
            return {}
        return {self.layout.entry_key(unit.backup_id, e.key): (e.stored_size, e.sha256) for e in manifest.objects}

    def _copy(self, key: str, expected: tuple[int, str] | None, result: CopyResult) -> str | None:
        """Copy one object from the first source with a good copy; None when done, else why not."""
        problems = []
        for name, source in self.sources.items():
            try:
                info = source.stat(key)
                handle = source.open(key)
            except StorageError as exc:
                problems.append(f"{name}: {exc}")
                continue
            size, sha256 = expected if expected else (info.size, None)
            checked = _Checked(handle, key, size, sha256)
            try:
                with contextlib.closing(handle):
                    self.target.put(key, checked, if_absent=True, metadata=info.metadata or None,
                                    retain_until=self.retain_until())
            except ObjectExists:
                return None  # another copier (or a write) got there first
            except (StorageError, IntegrityError) as exc:
                if not checked.source_failed:
                    raise  # the target's failure: nothing more can be copied to it now
                problems.append(f"{name}: {exc}")
                continue
            result.copied.append(key)
            result.bytes += info.size
            log.info("object copied", key=key, source=name, size=info.size)
            return None
        return "; ".join(problems) or "no source"


def read_all(storages: dict[str, Storage], job: str) -> dict[str, Listing]:
    """Each reachable repository's listing (an unreachable one is left out and logged)."""
    listings = {}
    for name, storage in storages.items():
        try:
            listings[name] = Listing.read(storage, job)
        except StorageError as exc:
            log.warning("repository not reachable; its copy state is unknown", storage=name, error=str(exc))
    return listings


def for_target(target: JobContext, sources: dict[str, Storage], manifests: Manifests | None = None) -> Copier:
    """A copier into one repository of the job (``JobContext.for_storage``) that keeps to its own policy."""
    manifests = manifests or Manifests(target.name)
    retain_for = target.repository.retain_for

    def retain_until() -> dt.datetime | None:
        return None if retain_for is None else dt.datetime.now(dt.timezone.utc) + retain_for

    return Copier(target.name, target.storage, sources, retain_until, target_keep(target, sources, manifests),
                  manifests)


def target_keep(target: JobContext, sources: dict[str, Storage], manifests: Manifests) -> Callable[[list[Listing]], Keep]:
    """What the target's policy keeps of given listings (pins read from the target)."""
    def keep(listings: list[Listing]) -> Keep:
        if target.job.retention.is_empty():
            return keep_all
        pinned = Pins(target.storage, target.name).ids()
        return policy_keeps(listings, Layout(target.name), target.job.retention, manifests,
                            [*sources.values(), target.storage], pinned=pinned, tz=target.settings.daemon.timezone)
    return keep


def measure(contexts: dict[str, JobContext], listings: dict[str, Listing], manifests: Manifests,
            last: dict[str, Listing] | None = None) -> dict[str, Behind]:
    """How far behind each repository of a job is, by its own policy (``contexts``: ``for_storage`` each).
    One without a listing now is judged by ``last`` (its last one seen), else as empty."""
    last = last or {}
    job = next(iter(contexts.values())).name
    known = {name: listings.get(name) or last.get(name) or Listing({}) for name in contexts}
    storages = {name: one.storage for name, one in contexts.items() if name in listings}
    keeps = {}
    for name, one in contexts.items():
        try:
            keeps[name] = target_keep(one, storages, manifests)(list(known.values()))
        except StorageError as exc:  # its pins cannot be read: count everything it lacks
            log.warning("repository's policy not planned; counting everything it lacks", storage=name,
                        error=str(exc))
    return behind(known, Layout(job), keeps)


def lagging(ctx: JobContext) -> list[dict[str, object]]:
    """Per repository of the job: reachable or not (and why), objects it lacks, the oldest one's time."""
    contexts = {name: ctx.for_storage(name) for name in ctx.job.storages}
    try:
        listings: dict[str, Listing] = {}
        errors: dict[str, str] = {}
        for name, one in contexts.items():
            try:
                listings[name] = Listing.read(one.storage, ctx.name)
            except StorageError as exc:
                errors[name] = str(exc)
        lags = measure(contexts, listings, Manifests(ctx.name)) if listings else {}
        report: list[dict[str, object]] = []
        for name in contexts:
            lag = lags.get(name) if name not in errors else None
            report.append({"storage": name, "reachable": name not in errors, "error": errors.get(name),
                           "behind_objects": lag.objects if lag else None,
                           "oldest_missing": format_timestamp(lag.oldest) if lag and lag.oldest else None})
        return report
    finally:
        for one in contexts.values():
            one.close()
