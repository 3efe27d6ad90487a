"""What a database driver plugin implements, and what the core hands it.

A driver starts native tools and yields named byte streams plus metadata; it
never compresses, encrypts, uploads or decides retention. During a backup it
passes each stream to the ``sink`` the core gives it; during a restore it reads
plaintext streams from a ``BackupSource``.
"""

from __future__ import annotations

import abc
import threading
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, ClassVar, Iterable, Protocol, Sequence, runtime_checkable

import structlog
from pydantic import BaseModel, ConfigDict

from backupd.errors import BackupNotFound, UsageError
from backupd.logarchive import LogArchive, LogObject, PushResult, newest_of
from backupd.lognaming import LogNaming
from backupd.manifest import Manifest, ObjectEntry, PitrStart
from backupd.paths import spool_dir
from backupd.pipeline import Priority
from backupd.sandbox import Sandbox, SandboxPolicy, unprivileged_user
from backupd.storage import Readable
from backupd.timeutil import format_timestamp


class DriverOptions(BaseModel):
    """Base for a driver's connection keys; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class StreamSink(Protocol):
    def __call__(self, name: str, source: Readable) -> ObjectEntry:
        """Store one stream (read to EOF) as ``<name>.zst.age``; return its entry.

        A driver may store two streams at once from two threads (a small side stream
        while the main dump runs); each name once.
        """


@dataclass
class BackupResult:
    """What a driver reports about a finished backup (all of it goes in the manifest)."""

    metadata: dict[str, Any] = field(default_factory=dict)
    row_counts: dict[str, int] = field(default_factory=dict)
    tool_versions: dict[str, str] = field(default_factory=dict)
    #: where this backup's archived logs begin (``archive_logs = true``); the manifest's ``metadata.pitr``
    pitr: PitrStart | None = None

    def manifest_metadata(self) -> dict[str, Any]:
        """``metadata`` with ``pitr`` last, as the manifest records it."""
        return self.metadata if self.pitr is None else {**self.metadata, "pitr": self.pitr.to_metadata()}


class BackupSource(Protocol):
    """A committed backup, readable as plaintext streams, plus the job's archived logs."""

    @property
    def manifest(self) -> Manifest:
        """The backup's whole manifest (in ``log_reach``, possibly the index's summary of it)."""

    @property
    def chain(self) -> list[Manifest]:
        """The backups a restore of ``manifest`` needs, full first, ``manifest`` last (``[manifest]`` for a
        full); each read and signature-checked like ``manifest`` itself."""

    def open(self, name: str) -> BinaryIO:
        """The named stream, decrypted and decompressed; corruption raises on read."""

    def open_from(self, backup_id: str, name: str) -> BinaryIO:
        """The named stream of another backup of ``chain`` (BackupNotFound for one outside it)."""

    def logs(self, kind: str) -> LogArchive:
        """The job's archive of ``wal``, ``binlog`` or ``oplog`` objects."""

    def open_log(self, kind: str, name: str) -> BinaryIO:
        """One archived log, decrypted and decompressed."""


class LogArchiver(Protocol):
    """A continuous log shipper the daemon supervises (restarting it with backoff)."""

    name: str  # e.g. "binlog:orders"

    def run(self, stop: threading.Event) -> None:
        """Ship logs until ``stop`` is set; raise on a failure the daemon should restart after."""


@runtime_checkable
class ReconnectingArchiver(LogArchiver, Protocol):
    """A log archiver that retries its source itself (reconnects) instead of raising.

    It must say how that goes: the daemon reports it down (``backupd_archiver_up`` 0,
    ``/healthz`` 503) while its source fails, however long it keeps retrying.
    """

    def source_error(self) -> str | None:
        """None while the source is reached; else why the last attempt to reach it failed."""


@dataclass(frozen=True)
class RestoreTarget:
    kind: str  # time | lsn | xid | name | position | gtid
    value: str
    time: dt.datetime | None = None


@dataclass
class RestoreRequest:
    to: str
    target: RestoreTarget | None = None
    #: restore up to the first gap in the archived logs, knowingly (``--to-gap``)
    to_gap: bool = False
    #: the timeline to recover along (PostgreSQL ``--target-timeline``: a number or "latest"); None: the cluster's own
    target_timeline: str | None = None
    #: PostgreSQL: "off" keeps a restored copy from archiving into the job's WAL; "preserve" restores the primary itself
    archive_mode: str = "off"
    tables: list[str] = field(default_factory=list)
    dry_run: bool = False
    force: bool = False
    clean: bool = False
    jobs: int = 1
    target_action: str | None = None
    password_file: Path | None = None
    #: PostgreSQL physical: restore over an existing (stopped) data directory, rewriting only what differs
    delta: bool = False
    #: PostgreSQL physical: tablespace name (or oid) -> the directory it is restored to
    tablespace_map: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LogReach:
    """How far replay from one backup can go in the archived logs: to the first gap, or to the newest log."""

    last_log: str | None = None  #: the last log replay can use
    until: dt.datetime | None = None  #: when ``last_log`` arrived in storage: the window's end as listing shows it
    first_missing: str | None = None  #: the first log replay needs that the archive lacks (None: no gap)
    missing: tuple[str, ...] = ()  #: every missing log, as messages ("missing WAL segment ...")
    notes: tuple[str, ...] = ()  #: what else an operator should know (a timeline replay will not follow)

    @property
    def broken(self) -> bool:
        return self.first_missing is not None


@dataclass
class Check:
    """One line of ``backupd check`` or of a verification report."""

    name: str
    ok: bool
    detail: str = ""
    warning: bool = False


@dataclass
class VerifyOutcome:
    row_counts: dict[str, int] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DriverContext:
    job: str
    settings: Any  # backupd.settings.JobSettings
    options: Any  # the driver's own options model instance
    state_dir: Path
    #: The job's log archive for a kind ("wal", "binlog", "oplog"), encrypting to the job's recipients.
    logs: Callable[[str], LogArchive] | None = None
    log: Any = field(default_factory=lambda: structlog.get_logger("backupd.driver"))
    #: The configuration file in use, for commands a driver hands to others (PostgreSQL's restore_command).
    config_path: Path | None = None
    #: Read one archived log file back, decrypted (``kind``, ``name``): needs the identity file, so
    #: it raises a BackupdError on a host without it. For plans that look inside logs (a dry run).
    open_log: Callable[[str, str], BinaryIO] | None = None
    #: How scratch servers run (bubblewrap or not) and which host paths they must never see.
    sandbox: SandboxPolicy = field(default_factory=SandboxPolicy)
    #: Every usable backup of the job, newest first, read from storage on each call. ``choose_backup`` gets
    #: only the named backup when one is named; a plan that describes the others (a PITR window) asks here.
    manifests: Callable[[], list[Manifest]] | None = None
    #: One stream of a committed backup (its manifest, the stream's name), decrypted: needs the identity
    #: file, so it raises a BackupdError on a host without it (a diff's planning falls back to a full).
    open_stream: Callable[[Manifest, str], BinaryIO] | None = None

    @property
    def spool_dir(self) -> Path:
        path = spool_dir(self.state_dir, self.job)
        path.mkdir(parents=True, exist_ok=True)
        return path


class Driver(abc.ABC):
    #: Methods this driver supports; the first is the default.
    methods: ClassVar[tuple[str, ...]] = ("logical",)
    options_model: ClassVar[type[BaseModel]] = DriverOptions
    #: What the driver can do beyond backup/restore/verify (``backupd.descriptor.WAL_ARCHIVING``).
    #: Built-in drivers take methods, options model and capabilities from their package's descriptor.
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: How the logs this driver archives are named (``backupd.lognaming``); built-ins take it from their descriptor.
    log_namings: ClassVar[tuple[LogNaming, ...]] = ()
    #: A backup's compression priority when the job sets no ``cpu_priority``. "normal" suits a
    #: dump whose own producers (server and tool) keep every core busy: lowered compression would
    #: starve the chain; a driver whose tools leave a share free may prefer "low".
    default_cpu_priority: ClassVar[Priority] = "normal"
    #: OS users a scratch server may run as when backupd is root and the job sets no ``os_user``
    #: (the first that exists; else ``nobody``). Scratch servers never run as root.
    scratch_users: ClassVar[tuple[str, ...]] = ()

    def __init__(self, context: DriverContext) -> None:
        self.context = context
        self.options = context.options
        self.log = context.log

    @property
    def default_method(self) -> str:
        return self.context.settings.method or self.methods[0]

    @property
    def cpu_priority(self) -> Priority:
        return self.context.settings.cpu_priority or self.default_cpu_priority

    def scratch_user(self) -> str | None:
        """Who scratch servers and restored content run as: None (ourselves) unless backupd is root."""
        return unprivileged_user(self.context.settings.os_user, self.scratch_users)

    def scratch_sandbox(self, writable: list[Path], readable: list[Path] | None = None) -> Sandbox:
        """The sandbox for one scratch server writing only ``writable`` (SandboxUnavailable if it cannot run)."""
        return self.context.sandbox.for_scratch(writable, user=self.scratch_user(), readable=readable or [])

    @abc.abstractmethod
    def backup(self, method: str, sink: StreamSink) -> BackupResult:
        """Take one backup, passing every stream to ``sink``; raise DriverError on any failure."""

    def committed(self, manifest: Manifest) -> None:
        """Called once ``manifest``, a backup this driver instance just took, is committed (keep local state
        about it here: nothing the backup needs, since a failure here only warns)."""

    def shown_metadata(self, manifest: Manifest) -> dict[str, Any]:
        """The metadata ``backupd show`` prints: the manifest's own, or with what it only references filled in."""
        return manifest.metadata

    @abc.abstractmethod
    def restore(self, source: BackupSource, request: RestoreRequest) -> str:
        """Restore to ``request.to``; return what to tell the operator (next steps)."""

    @abc.abstractmethod
    def verify(self, source: BackupSource, scratch: Path, checks: list[str]) -> VerifyOutcome:
        """Restore into a scratch place under ``scratch`` and measure it (counts, user checks)."""

    def log_archivers(self) -> list[LogArchiver]:
        """Continuous archivers for ``archive_logs = true`` (binlog stream, oplog tailer, WAL push-ahead)."""
        return []

    def log_reach(self, source: BackupSource) -> LogReach | None:
        """How far this backup's archived logs reach: the last usable log and the first gap.

        None when the driver keeps no logs for it. Works from a listing alone (no key),
        so ``list``, ``status``, ``prune`` and integrity checks can show where PITR breaks;
        verification fails on any gap (one message per missing file, naming it). This
        default knows no log order: it reaches the newest archived log and finds no gap;
        drivers that archive logs say better.
        """
        pitr = source.manifest.metadata.get("pitr")
        if not isinstance(pitr, dict) or not pitr.get("log_kind"):
            return None
        archive = source.logs(str(pitr["log_kind"]))
        first = str(pitr.get("first_log") or "")
        if archive.listings is None and first:  # asked about one backup alone: only the logs from its first on
            newest = newest_of(archive.list_from(first))
        else:  # the listing of the whole archive the command's backups share (``JobContext.one_listing``)
            newest = archive.newest_stored()
        return LogReach(last_log=newest.name, until=newest.modified) if newest is not None else LogReach()

    def extend_reach(self, manifest: Manifest, recorded: LogReach, checkpoint: str,
                     tail: Sequence[LogObject]) -> LogReach | None:
        """``recorded``, this backup's unbroken reach as a full listing of the archive found it, carried over
        ``tail``: the logs named from ``checkpoint`` (the greatest name that listing held) on, in name order,
        ``checkpoint`` itself included while it is there. None when the tail cannot decide it (a new timeline,
        a reach that did not end at ``checkpoint``): the caller then lists the whole archive (``log_reach``).

        Works from the listing alone, like ``log_reach``. This default, like its ``log_reach``, knows no
        log order: the newest log stored."""
        epoch = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
        newest = max(tail, key=lambda obj: obj.modified or epoch, default=None)
        if newest is None or (newest.modified or epoch) < (recorded.until or epoch):
            return recorded
        return LogReach(last_log=newest.name, until=newest.modified)

    def control_handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        """Requests the daemon's control socket serves for this job (e.g. ``wal-push``), by op name."""
        return {}

    def check(self) -> Iterable[Check]:
        """Connectivity, privileges, tool versions; one Check per line of output."""
        return []

    def choose_backup(self, manifests: Sequence[Manifest], request: RestoreRequest, backup_id: str | None) -> Manifest:
        """The named backup; else the newest that finished by the target time; else the newest.

        Drivers with log replay override this to pick the base for a PITR target.
        """
        job = self.context.job
        if not manifests:
            raise BackupNotFound(f"no backups for job {job}", hint=f"run `backupd backup {job}`")
        if backup_id:
            for manifest in manifests:
                if manifest.backup_id == backup_id:
                    return manifest
            raise BackupNotFound(f"backup {backup_id} not found for job {job}")
        target = request.target
        if target is not None and target.kind != "time":
            raise UsageError(f"driver {self.context.settings.driver} cannot restore to a --target-{target.kind}")
        if target is not None and target.time is not None:
            from backupd.indexread import newest_finished_by  # the index's summary, where that is what was read

            chosen = newest_finished_by(manifests, target.time)
            if chosen is None:
                oldest = min(manifests, key=lambda m: m.finished_at)
                raise UsageError(
                    f"target time {format_timestamp(target.time)} is before the oldest backup "
                    f"(restorable from {format_timestamp(oldest.finished_at)})"
                )
            return chosen
        return max(manifests, key=lambda m: m.finished_at)

    def describe_restore(self, manifest: Manifest, request: RestoreRequest) -> list[str]:
        """Lines of the plan ``--dry-run`` prints."""
        return [f"restore backup {manifest.backup_id} ({manifest.method}) to {request.to}"]

    def check_to(self, request: RestoreRequest) -> None:
        """Refuse (UsageError, exit 2) a ``--to`` of a kind this driver cannot restore to, using
        ``backupd.restore_to`` (a directory, a file, a URL of its scheme). Called before anything is read."""

    def check_target(self, manifest: Manifest, request: RestoreRequest) -> None:
        """Raise what restoring ``manifest`` to ``request.to`` would refuse (an existing file, a non-empty
        directory, a database holding data) without changing anything. Called before a restore writes its
        first byte, and by ``--dry-run``, which then exits non-zero."""


class PitrDrill(abc.ABC):
    """A driver capability: ``verify --pitr-drill`` (a restore to a random moment of the PITR window)."""

    @abc.abstractmethod
    def pitr_drill(self, source: BackupSource, scratch: Path, target: RestoreTarget) -> VerifyOutcome:
        """Restore ``source`` into a throwaway instance under ``scratch``, replayed to ``target`` (a time
        inside the PITR window); it must start and answer queries, then the user's checks run on it.

        Raise an IntegrityError/DriverError when it cannot be restored there; always stop what was started.
        """


class IncrementalBackup(abc.ABC):
    """A driver capability (``backupd.descriptor.INCREMENTAL_BACKUP``): diff and incr backups of method
    physical (DESIGN.md "Backup types"). Restores get the whole chain in ``BackupSource.chain``."""

    @abc.abstractmethod
    def backup_incremental(self, method: str, sink: StreamSink, backup_type: str,
                           chain: list[Manifest]) -> BackupResult:
        """Take a ``backup_type`` ("diff" or "incr") backup storing only what changed since ``chain[-1]``.

        ``chain`` is the parent's chain, its full first and the parent last, each manifest checked.
        Streams go to ``sink`` as for ``Driver.backup``; the core records ``type`` and ``parent`` in the
        manifest's metadata (the driver's metadata must not set them).
        """

    def parent_problem(self, chain: list[Manifest]) -> str | None:
        """Why a diff or incr cannot be taken against ``chain`` on this host, so the core takes a full
        instead (with a warning naming it); None when it can."""
        return None


class WalArchiving(abc.ABC):
    """A driver capability: the ``wal-push``/``wal-fetch`` commands PostgreSQL runs (archive_command and
    restore_command), and the background prefetcher that keeps replay fed."""

    @abc.abstractmethod
    def wal_push(self, path: Path) -> PushResult:
        """Archive one WAL file (a path PostgreSQL names); return once it is durable."""

    @abc.abstractmethod
    def wal_fetch(self, filename: str, dest: Path, identities: Sequence[object], key_file: str | None) -> bool:
        """Write the archived ``filename`` to ``dest``; False when the archive lacks it. The driver starts its
        prefetcher (``backupd.spool.start_prefetcher``) after a file that others follow."""

    @abc.abstractmethod
    def wal_prefetch(self, first: str, identities: Sequence[object], key_file: str | None, *,
                     inclusive: bool = True) -> int:
        """The background half of wal-fetch: keep the spool ahead of replay from ``first`` (return at once, 0,
        when nothing follows ``first``)."""
