"""The PostgreSQL driver: logical (pg_dump) and physical (pg_basebackup) backups, WAL archiving, PITR."""

from __future__ import annotations

import contextlib
import functools
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator, Sequence

from backupd.driver import (BackupResult, BackupSource, Check, Driver, DriverContext, IncrementalBackup, LogArchiver,
                            LogReach, PitrDrill, RestoreRequest, RestoreTarget, StreamSink, VerifyOutcome, WalArchiving)
from backupd.errors import ArchiveGap, BackupdError, ConfigError, DriverError, UsageError
from backupd.manifest import Manifest
from backupd.timeutil import format_timestamp
from drivers.postgres import DESCRIPTOR, logical
from drivers.postgres.connection import Conn
from drivers.postgres.filemap import LEGACY_KEY, MAP_STREAM, STREAM_KEY, FileMap, matches, read_map
from drivers.postgres.mapstore import MapStore
from drivers.postgres.options import PostgresOptions
from drivers.postgres.walnames import is_segment

# A logical backup's start-up is part of its time (bench/postgres.py: no daemon, against pg_dump): what only
# physical backups, restores, verification, checks and WAL archiving use is imported by the methods that use it.
if TYPE_CHECKING:
    from backupd.logarchive import LogArchive, LogObject, PushResult
    from drivers.postgres.recovery import RecoveryPlan
    from drivers.postgres.walarchive import WalPusher


def meta_count(manifest: Manifest) -> int:
    facts = manifest.metadata.get(STREAM_KEY)
    if isinstance(facts, dict):
        count = facts.get("files")
        return count if isinstance(count, int) else 0
    table = manifest.metadata.get(LEGACY_KEY)
    files = table.get("files") if isinstance(table, dict) else None
    return len(files) if isinstance(files, list) else 0


class PostgresDriver(Driver, WalArchiving, PitrDrill, IncrementalBackup):
    methods = DESCRIPTOR.methods
    capabilities = DESCRIPTOR.capabilities
    log_namings = DESCRIPTOR.log_namings
    scratch_users = ("postgres",)
    options_model = PostgresOptions

    def __init__(self, context: DriverContext) -> None:
        super().__init__(context)
        self.maps = MapStore(context.state_dir, context.job)
        self._parents: dict[str, FileMap] = {}  #: parent maps parent_problem loaded, by backup id
        self._taken: bytes | None = None  #: the file map of the backup this instance took, kept once committed

    @functools.cached_property
    def restoring(self) -> RecoveryPlan:
        """The state one restore's steps share; replaced by each choose_backup (the core calls it first)."""
        return self._plan()

    @functools.cached_property
    def conn(self) -> Conn:
        return Conn.from_url(self.options.dsn, self.options.password_file)

    def _plan(self, manifests: Sequence[Manifest] = ()) -> RecoveryPlan:
        from drivers.postgres.recovery import RecoveryPlan

        return RecoveryPlan(self.wal_archive, self.options.bin_dir, manifests)

    def wal_archive(self) -> LogArchive:
        if self.context.logs is None:
            raise DriverError("no log archive is available to this driver context")
        return self.context.logs("wal")

    @functools.cached_property
    def pusher(self) -> WalPusher:
        """One per driver instance: the control handler and the push-ahead archiver share it."""
        from drivers.postgres.walarchive import WalPusher

        data_dir = Path(self.options.data_dir) if self.options.data_dir else None
        return WalPusher(self.wal_archive(), self.context.job, data_dir, self.context.settings.archive_logs)

    # -- backups ---------------------------------------------------------------------------
    def backup(self, method: str, sink: StreamSink) -> BackupResult:
        if method == "physical":
            from drivers.postgres import engine, physical

            if engine.unusable(self.options) is None:
                result, self._taken = engine.backup(self.conn, self.options, self.context, sink)
                return result
            return physical.backup(self.conn, self.options, self.context, sink)
        return logical.backup(self.conn, self.options, self.context.spool_dir, self.cpu_priority, sink)

    def backup_incremental(self, method: str, sink: StreamSink, backup_type: str,
                           chain: list[Manifest]) -> BackupResult:
        """A diff or incr (``chain``: full..parent, oldest first) by the file engine; a full when chain is empty."""
        from drivers.postgres import engine

        if method != "physical":
            raise UsageError(f"--type {backup_type}: only physical backups have types (this is {method})")
        if backup_type == "full" or not chain:
            return self.backup(method, sink)
        if reason := engine.unusable(self.options):
            raise UsageError(f"--type {backup_type} needs the file engine, and {reason}; pg_basebackup takes only "
                             "full backups", hint="set data_dir to the cluster's data directory, readable by backupd")
        engine.require_map(chain[-1])
        parent = self._parents.get(chain[-1].backup_id)
        if parent is None:
            parent = self._parent_map(chain[-1])
        result, self._taken = engine.backup(self.conn, self.options, self.context, sink, backup_type, chain, parent)
        return result

    def _parent_map(self, parent: Manifest) -> FileMap:
        """The parent's map: the one this host kept, else its stream read with the identity file."""
        def open_stream() -> BinaryIO:
            if self.context.open_stream is None:
                raise DriverError("this driver context cannot read backup streams")
            return self.context.open_stream(parent, MAP_STREAM)
        return read_map(parent, self.maps.read, open_stream)

    def parent_problem(self, chain: list[Manifest]) -> str | None:
        from drivers.postgres import engine, filerestore

        parent = chain[-1]
        if engine.unusable(self.options) or not filerestore.is_file_engine(parent):
            return None  # backup_incremental refuses these, naming why
        try:
            self._parents[parent.backup_id] = self._parent_map(parent)
        except BackupdError as exc:
            return (f"the file map of parent {parent.backup_id} is not kept on this host "
                    f"({self.maps.path(parent.backup_id)}: missing, or not matching its manifest) and reading it "
                    f"from the repository failed: {exc}")
        return None

    def committed(self, manifest: Manifest) -> None:
        """Keep the new backup's map (0600) for the next diff or incr; drop those of backups gone since."""
        taken, self._taken = self._taken, None
        if taken is not None and matches(manifest, taken):
            self.maps.write(manifest.backup_id, taken)
        if self.context.manifests is not None:
            self.maps.prune({m.backup_id for m in self.context.manifests()} | {manifest.backup_id})

    def shown_metadata(self, manifest: Manifest) -> dict[str, Any]:
        """With ``file_map`` filled in from the kept map or the stream, where this host can read one."""
        if STREAM_KEY not in manifest.metadata:
            return manifest.metadata
        try:
            files = self._parent_map(manifest)
        except BackupdError:
            return manifest.metadata
        return {**manifest.metadata, LEGACY_KEY: files.to_metadata()}

    # -- restores --------------------------------------------------------------------------
    def choose_backup(self, manifests: Sequence[Manifest], request: RestoreRequest, backup_id: str | None) -> Manifest:
        from drivers.postgres import pitr

        # a new restore: the archive is listed again, once; a named backup came alone, the others are read
        # only when the plan describes the restorable window
        plan = self.restoring = self._plan(() if backup_id else manifests)
        if pitr.is_physical_target(request.to):
            # a target is looked for from the newest backup with WAL on: its folders reach the archive's end
            return pitr.choose(manifests, request, backup_id, self.context.job,
                               lambda: plan.view_for(pitr.newest_with_wal(manifests)))
        if request.target is not None:
            raise UsageError(f"--target-{request.target.kind}: a logical backup restores as of its own snapshot; "
                             "point-in-time targets need --to DIR (a physical backup with archived WAL)")
        logical_ones = [m for m in manifests if m.method == "logical"]
        if backup_id and any(m.backup_id == backup_id and m.method == "physical" for m in manifests):
            raise UsageError(f"backup {backup_id} is physical; restore it with --to DIR (a data directory)")
        return super().choose_backup(logical_ones, request, backup_id)

    def describe_restore(self, manifest: Manifest, request: RestoreRequest) -> list[str]:
        from drivers.postgres import filerestore, pitr
        from drivers.postgres.cluster import run_as

        meta = manifest.metadata
        if manifest.method == "logical":
            what = f"tables {', '.join(request.tables)} of" if request.tables else "database"
            mode = "--clean: objects in the backup are dropped first" if request.clean else \
                "refuses a non-empty database (pass --clean to replace its objects)"
            return [f"backup {manifest.backup_id} (logical, {format_timestamp(manifest.finished_at)}, "
                    f"{len(manifest.row_counts)} tables)",
                    f"pg_restore {what} {meta.get('database')} into {request.to} (jobs {request.jobs}); {mode}"]
        view = self.restoring.view_for([manifest])
        first = meta.get("wal_range", {}).get("first", "?")
        needed = [n for n in view.all_segments() if n >= first.split("/")[-1]]
        if not self.restoring.manifests and self.context.manifests:
            self.restoring.manifests = list(self.context.manifests())
        physical_ones = [m for m in self.restoring.manifests or [manifest] if m.method == "physical"]
        lines = [
            f"backup {manifest.backup_id} (physical, ended {format_timestamp(pitr.backup_end(manifest))}, "
            f"timeline {meta.get('timeline')}, LSN {meta.get('start_lsn')} to {meta.get('stop_lsn')})",
            f"WAL: from {first} to {needed[-1] if needed else first} "
            f"({len(needed)} segments archived from there, fetched by `backupd wal-fetch` during recovery)",
            *self._planned_target(manifest, request),
            pitr.describe_window(physical_ones, view),
            f"data directory {request.to}: written with mode 0700" + (
                f", owned by {run_as(self.context.settings.os_user)}" if run_as(self.context.settings.os_user) else ""),
        ]
        if request.target is not None and request.target.kind == "name":
            lines.append("a restore point is found only by replay: pass --backup ID when it predates this backup")
        if filerestore.is_file_engine(manifest):
            lines += self._file_engine_plan(manifest, request)
        return lines

    def _file_engine_plan(self, manifest: Manifest, request: RestoreRequest) -> list[str]:
        from drivers.postgres import engine, filerestore

        workers = request.jobs if request.jobs > 1 else engine.workers(self.options)
        how = ("--delta: files compared chunk by chunk, only differing chunks fetched, files the backup lacks "
               "removed" if request.delta else "every file written")
        lines = [f"file engine: {meta_count(manifest)} files, {len(manifest.objects)} objects of this backup, "
                 f"{workers} workers; {how}"]
        for space in filerestore.tablespaces(manifest, request.tablespace_map):
            lines.append(f"tablespace {space.name} (oid {space.oid}) -> {space.location}")
        return lines

    def _planned_target(self, manifest: Manifest, request: RestoreRequest) -> list[str]:
        """What recovery will aim at, as restore() will decide it. Reading the newest commit needs the identity file."""
        from drivers.postgres import pitr, recovery

        if not manifest.metadata.get("pitr"):
            return [pitr.target_text(request)]
        notes = self.restoring.gap_note(self.context.open_log, manifest, request)
        try:
            planned, newest = self.restoring.resolve_target(self.context.open_log, manifest, request)
        except ArchiveGap:
            raise
        except BackupdError as exc:
            return [*notes, pitr.target_text(request), f"(not compared with the archive's newest commit: {exc})"]
        return [*notes, *recovery.after_newest(request, newest), pitr.target_text(planned)]

    def check_to(self, request: RestoreRequest) -> None:
        from backupd import restore_to

        takes = "a data directory (physical backups) or a postgresql:// URL (logical backups)"
        if restore_to.is_url(request.to):
            restore_to.url(request.to, "postgres", ("postgresql", "postgres"), takes)
        else:
            restore_to.directory(request.to, "postgres", takes=takes)

    def check_target(self, manifest: Manifest, request: RestoreRequest) -> None:
        from drivers.postgres import filerestore, physical

        if manifest.method == "logical":
            if request.delta or request.tablespace_map:
                raise UsageError("--delta and --tablespace-map restore physical backups only")
            logical.check_target(self.options, request)
            return
        dest = Path(request.to).expanduser().absolute()
        if not filerestore.is_file_engine(manifest):
            if request.delta or request.tablespace_map:
                raise UsageError(f"backup {manifest.backup_id} was taken by pg_basebackup (one tar stream): "
                                 "--delta and --tablespace-map need a backup taken by the file engine")
            physical.check_directory(dest, request.force)
            return
        if request.delta:
            if dest.exists() and not dest.is_dir():
                raise UsageError(f"{dest}: exists and is not a directory; --to must name a data directory")
            if (dest / "postmaster.pid").exists():
                raise UsageError(f"{dest}: a server may be running on it (postmaster.pid exists); stop it first")
        else:
            physical.check_directory(dest, request.force)
        filerestore.check_tablespaces(filerestore.tablespaces(manifest, request.tablespace_map), dest, request.delta)

    def restore(self, source: BackupSource, request: RestoreRequest) -> str:
        from drivers.postgres import engine, filerestore, physical, pitr, recovery
        from drivers.postgres.cluster import chown_tree, run_as

        manifest = source.manifest
        if manifest.method == "logical":
            return logical.restore(self.options, self.context.spool_dir, source, request)
        if request.tables:
            raise UsageError("--table needs a logical backup; a physical backup restores the whole cluster")
        dest = Path(request.to).expanduser().absolute()
        archived = bool(manifest.metadata.get("pitr"))
        asked, newest = request, None
        if archived:
            request, newest = self.restoring.resolve_target(source.open_log, manifest, request)
        self.restoring = self._plan()  # used up: a later restore lists the archive afresh
        if not archived and request.target is not None:
            raise UsageError(f"backup {manifest.backup_id} was taken without WAL archiving; it restores only "
                             "to its own end, not to a --target")
        engine_note = ""
        with self._restore_directory(manifest, dest, request) as work:
            if filerestore.is_file_engine(manifest):
                spaces = filerestore.tablespaces(manifest, request.tablespace_map)
                workers = request.jobs if request.jobs > 1 else engine.workers(self.options)
                outcome = filerestore.restore(source, work, spaces, workers, delta=request.delta)
                count = outcome.files
                engine_note = (f"{outcome.objects} objects read by {workers} workers, {outcome.fetched_bytes} bytes "
                               "written")
                if request.delta:
                    engine_note += f"; delta: {outcome.rewritten} files rewritten, {outcome.removed} removed"
                for space in spaces:
                    chown_tree(space.location, self.context.settings.os_user)
            else:
                count = physical.restore_files(source, work)
            if archived:
                config = self.context.config_path
                settings = pitr.recovery_settings(request, pitr.restore_command(self.context.job, config))
                pitr.write_recovery(work, settings, manifest.backup_id)
            if request.archive_mode == "off":
                pitr.write_settings(work, {"archive_mode": False}, "archive_mode = off: this copy archives nothing "
                                    f"into job {self.context.job}'s WAL (restore --archive-mode preserve keeps the "
                                    "backup's)")
        if archived:
            self.start_wal_prefetch(manifest)
        chown_tree(dest, self.context.settings.os_user)
        lines = [f"restored backup {manifest.backup_id} (physical, {count} files) to {dest}",
                 *([engine_note] if engine_note else []),
                 *self.restoring.gap_note(source.open_log, manifest, asked),
                 *recovery.after_newest(asked, newest),
                 "warning: the restored configuration (postgresql.conf, postgresql.auto.conf, pg_hba.conf and "
                 "what they include) is the backup's own, and runs when the server starts: review it first"]
        user = run_as(self.context.settings.os_user)
        start = f"pg_ctl -D {dest} start"
        if archived:
            lines.append(f"on start, recovery fetches WAL through backupd wal-fetch: {pitr.target_text(request)}")
        if request.archive_mode == "off":
            lines.append("archive_mode = off is set in postgresql.auto.conf: the restored cluster archives no WAL "
                         f"into job {self.context.job} (remove it, or restore with --archive-mode preserve, when "
                         "this is the primary itself)")
        else:
            lines.append("archive_mode and archive_command are the backup's (--archive-mode preserve): once "
                         f"promoted, this cluster archives into job {self.context.job}")
        lines.append(f"start the server: {f'runuser -u {user} -- ' if user else ''}{start}"
                     " (set another port in postgresql.auto.conf if the original server runs on this host)")
        return "\n".join(lines)

    @contextlib.contextmanager
    def _restore_directory(self, manifest: Manifest, dest: Path, request: RestoreRequest) -> Iterator[Path]:
        """Where the files go: ``dest`` itself for --delta, else a staged directory renamed into place."""
        from drivers.postgres import filerestore, physical

        if request.delta:
            yield dest
            return
        spaces = filerestore.tablespaces(manifest, request.tablespace_map) if filerestore.is_file_engine(manifest) \
            else []
        fresh = [space.location for space in spaces if not space.location.exists()]
        try:
            with physical.staged_directory(dest, request.force) as work:
                yield work
        except BaseException:
            for space in spaces:  # what this restore put in the tablespaces' own directories
                if space.location in fresh:
                    shutil.rmtree(space.location, ignore_errors=True)
                else:
                    shutil.rmtree(space.location / space.version_dir, ignore_errors=True)
            raise

    # -- verification ----------------------------------------------------------------------
    def verify(self, source: BackupSource, scratch: Path, checks: list[str]) -> VerifyOutcome:
        from drivers.postgres import verify

        return verify.verify(source, scratch, checks, bin_dir=self.options.bin_dir, sandbox=self.scratch_sandbox,
                             dbname=self.conn.dbname)

    def pitr_drill(self, source: BackupSource, scratch: Path, target: RestoreTarget) -> VerifyOutcome:
        from drivers.postgres import verify

        return verify.pitr_drill(source, scratch, target, self._plan(), bin_dir=self.options.bin_dir,
                                 sandbox=self.scratch_sandbox, dbname=self.conn.dbname,
                                 checks=self.context.settings.verify.checks)

    def log_reach(self, source: BackupSource) -> LogReach | None:
        """From this backup's start along its timelines to the first missing segment or the newest one.

        Timeline history files are read when a key is at hand; without one each
        timeline is checked for contiguity on its own (listing needs no key). Asked about one backup alone
        (no listing shared), only the WAL folders from its first segment on are listed.
        """
        from drivers.postgres import pitr, recovery

        meta = source.manifest.metadata
        if source.manifest.method != "physical" or not meta.get("pitr"):
            return None
        archive, start = source.logs("wal"), pitr.first_segment(source.manifest)
        if archive.listings is None and start is not None:  # one backup alone: the folders from its start on
            walk = pitr.FolderWalk(archive)
            walk.walk(start, across_gaps=True)
            view = walk.view()
        else:  # the listing of the whole archive the command's backups share (``JobContext.one_listing``)
            view = pitr.ArchiveView.scan(archive)
        return pitr.reach(source.manifest, view, recovery.histories(source.open_log, view))

    def extend_reach(self, manifest: Manifest, recorded: LogReach, checkpoint: str,
                     tail: Sequence[LogObject]) -> LogReach | None:
        """Contiguous successor segments on the reach's timeline; a new timeline: None (``log_reach`` decides)."""
        from drivers.postgres import pitr

        return pitr.extend(manifest, recorded, checkpoint, tail)

    # -- WAL archiving ---------------------------------------------------------------------
    def wal_push(self, path: Path) -> PushResult:
        return self.pusher.push(path)

    def wal_fetch(self, filename: str, dest: Path, identities: Sequence[object], key_file: str | None) -> bool:
        from backupd import spool
        from backupd.paths import wal_fetch_spool
        from drivers.postgres.walfetch import WalFetcher, fetch_with_retries

        fetcher = WalFetcher(self.wal_archive(), identities, key_file,
                             wal_fetch_spool(self.context.state_dir, self.context.job))
        if not fetch_with_retries(fetcher, filename, dest):
            return False
        if is_segment(filename):  # keep the next segments coming
            config = self.context.config_path
            spool.start_prefetcher(spool.directory(str(self.context.state_dir), self.context.job),
                                   str(config.absolute()) if config else None, self.context.job, filename, after=True)
        return True

    def wal_prefetch(self, first: str, identities: Sequence[object], key_file: str | None, *,
                     inclusive: bool = True) -> int:
        """The background half of wal-fetch: keep the spool ahead of replay from ``first``."""
        from backupd.paths import wal_fetch_spool
        from drivers.postgres.walfetch import Prefetcher

        if not is_segment(first):
            return 0  # a history file: replay asks for what follows it by name
        prefetcher = Prefetcher(self.wal_archive(), identities, key_file,
                                wal_fetch_spool(self.context.state_dir, self.context.job), self.options.wal_prefetch)
        return prefetcher.run(first, inclusive=inclusive)

    def start_wal_prefetch(self, manifest: Manifest) -> None:
        """Have the backup's first segments decrypted in the spool by the time the restored server asks."""
        from backupd import spool
        from drivers.postgres.cluster import run_as

        first = str(manifest.metadata.get("wal_range", {}).get("first", "")).rpartition("/")[2]
        if not first:
            return
        user = None
        name = run_as(self.context.settings.os_user)
        if name is not None:
            import pwd

            entry = pwd.getpwnam(name)
            user = (entry.pw_uid, entry.pw_gid)
        config = self.context.config_path
        spool.start_prefetcher(spool.directory(str(self.context.state_dir), self.context.job),
                               str(config.absolute()) if config else None, self.context.job, first, after=False,
                               user=user)

    def control_handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        return {"wal-push": self.pusher.handle}

    def log_archivers(self) -> list[LogArchiver]:
        from drivers.postgres.walarchive import PushAheadArchiver

        if not self.context.settings.archive_logs:
            return []
        if self.options.data_dir is None:
            raise ConfigError(f"jobs.{self.context.job}.data_dir: required to push WAL ahead (archive_logs = true)")
        return [PushAheadArchiver(self.pusher, Path(self.options.data_dir), self.options.wal_push_workers)]

    def check(self) -> Iterable[Check]:
        from drivers.postgres import checks, pitr

        yield from checks.run(self.conn, self.options, self.context, self.default_method, self.wal_archive)
        if self.context.settings.archive_logs and self.context.logs is not None:
            try:
                forked = pitr.forks(self.restoring.view)
            except BackupdError as exc:
                yield Check("WAL timelines", False, f"cannot list the archive: {exc}")
                return
            yield Check("WAL timelines", True, "; ".join(f"{why}; restores do not follow it unless "
                                                         f"--target-timeline {tli}" for tli, why in sorted(forked.items()))
                        or "only the cluster's own", warning=bool(forked))
