"""The PostgreSQL driver: logical (pg_dump) and physical (pg_basebackup) backups, WAL archiving, PITR."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from backupd import restore_to, spool
from backupd.driver import (BackupResult, BackupSource, Check, Driver, DriverContext, LogArchiver, LogReach,
                            PitrDrill, RestoreRequest, RestoreTarget, StreamSink, VerifyOutcome, WalArchiving)
from backupd.errors import ArchiveGap, BackupdError, ConfigError, DriverError, UsageError
from backupd.logarchive import LogArchive, PushResult
from backupd.manifest import Manifest
from backupd.paths import wal_fetch_spool
from backupd.timeutil import format_timestamp
from drivers.postgres import DESCRIPTOR, checks, logical, physical, pitr, recovery, verify
from drivers.postgres.cluster import chown_tree, run_as
from drivers.postgres.connection import Conn
from drivers.postgres.options import PostgresOptions
from drivers.postgres.walarchive import PushAheadArchiver, WalPusher
from drivers.postgres.walfetch import Prefetcher, WalFetcher, fetch_with_retries
from drivers.postgres.walnames import is_segment


class PostgresDriver(Driver, WalArchiving, PitrDrill):
    methods = DESCRIPTOR.methods
    capabilities = DESCRIPTOR.capabilities
    log_namings = DESCRIPTOR.log_namings
    scratch_users = ("postgres",)
    options_model = PostgresOptions

    def __init__(self, context: DriverContext) -> None:
        super().__init__(context)
        #: the state one restore's steps share; replaced by each choose_backup (the core calls it first)
        self.restoring = self._plan()

    @functools.cached_property
    def conn(self) -> Conn:
        return Conn.from_url(self.options.dsn, self.options.password_file)

    def _plan(self, manifests: Sequence[Manifest] = ()) -> recovery.RecoveryPlan:
        return recovery.RecoveryPlan(self.wal_archive, self.options.bin_dir, manifests)

    def wal_archive(self) -> LogArchive:
        if self.context.logs is None:
            raise DriverError("no log archive is available to this driver context")
        return self.context.logs("wal")

    @functools.cached_property
    def pusher(self) -> WalPusher:
        """One per driver instance: the control handler and the push-ahead archiver share it."""
        data_dir = Path(self.options.data_dir) if self.options.data_dir else None
        return WalPusher(self.wal_archive(), self.context.job, data_dir, self.context.settings.archive_logs)

    # -- backups ---------------------------------------------------------------------------
    def backup(self, method: str, sink: StreamSink) -> BackupResult:
        if method == "physical":
            return physical.backup(self.conn, self.options, self.context, sink)
        return logical.backup(self.conn, self.options, self.context.spool_dir, self.cpu_priority, sink)

    # -- restores --------------------------------------------------------------------------
    def choose_backup(self, manifests: list[Manifest], request: RestoreRequest, backup_id: str | None) -> Manifest:
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
        return lines

    def _planned_target(self, manifest: Manifest, request: RestoreRequest) -> list[str]:
        """What recovery will aim at, as restore() will decide it. Reading the newest commit needs the identity file."""
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
        takes = "a data directory (physical backups) or a postgresql:// URL (logical backups)"
        if restore_to.is_url(request.to):
            restore_to.url(request.to, "postgres", ("postgresql", "postgres"), takes)
        else:
            restore_to.directory(request.to, "postgres", takes=takes)

    def check_target(self, manifest: Manifest, request: RestoreRequest) -> None:
        if manifest.method == "logical":
            logical.check_target(self.options, request)
        else:
            physical.check_directory(Path(request.to).expanduser().absolute(), request.force)

    def restore(self, source: BackupSource, request: RestoreRequest) -> str:
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
        with physical.staged_directory(dest, request.force) as work:
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

    # -- verification ----------------------------------------------------------------------
    def verify(self, source: BackupSource, scratch: Path, checks: list[str]) -> VerifyOutcome:
        return verify.verify(source, scratch, checks, bin_dir=self.options.bin_dir, sandbox=self.scratch_sandbox,
                             dbname=self.conn.dbname)

    def pitr_drill(self, source: BackupSource, scratch: Path, target: RestoreTarget) -> VerifyOutcome:
        return verify.pitr_drill(source, scratch, target, self._plan(), bin_dir=self.options.bin_dir,
                                 sandbox=self.scratch_sandbox, dbname=self.conn.dbname,
                                 checks=self.context.settings.verify.checks)

    def log_reach(self, source: BackupSource) -> LogReach | None:
        """From this backup's start along its timelines to the first missing segment or the newest one.

        Timeline history files are read when a key is at hand; without one each
        timeline is checked for contiguity on its own (listing needs no key).
        """
        meta = source.manifest.metadata
        if source.manifest.method != "physical" or not meta.get("pitr"):
            return None
        view = pitr.ArchiveView.scan(source.logs("wal"))
        return pitr.reach(source.manifest, view, recovery.histories(source.open_log, view))

    # -- WAL archiving ---------------------------------------------------------------------
    def wal_push(self, path: Path) -> PushResult:
        return self.pusher.push(path)

    def wal_fetch(self, filename: str, dest: Path, identities: Sequence[object], key_file: str | None) -> bool:
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
        if not is_segment(first):
            return 0  # a history file: replay asks for what follows it by name
        prefetcher = Prefetcher(self.wal_archive(), identities, key_file,
                                wal_fetch_spool(self.context.state_dir, self.context.job), self.options.wal_prefetch)
        return prefetcher.run(first, inclusive=inclusive)

    def start_wal_prefetch(self, manifest: Manifest) -> None:
        """Have the backup's first segments decrypted in the spool by the time the restored server asks."""
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
        if not self.context.settings.archive_logs:
            return []
        if self.options.data_dir is None:
            raise ConfigError(f"jobs.{self.context.job}.data_dir: required to push WAL ahead (archive_logs = true)")
        return [PushAheadArchiver(self.pusher, Path(self.options.data_dir), self.options.wal_push_workers)]

    def check(self) -> Iterable[Check]:
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
