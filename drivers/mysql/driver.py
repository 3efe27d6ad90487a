"""MySQL/MariaDB: consistent dumps, physical copies, binlog archiving and point-in-time restore."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

from backupd import restore_to
from backupd.driver import (BackupResult, BackupSource, Check, Driver, IncrementalBackup, LogArchiver, LogReach,
                            PitrDrill, RestoreRequest, RestoreTarget, StreamSink, VerifyOutcome)
from backupd.errors import BackupNotFound, DriverError, IntegrityError, UsageError
from backupd.logarchive import LogArchive, LogObject
from backupd.manifest import Manifest, PitrStart
from backupd.timeutil import format_timestamp, parse_timestamp, utcnow
from drivers.mysql import DESCRIPTOR, binlog, checks, load, logical, physical, pitr, scratch
from drivers.mysql.archiver import BinlogArchiver, streamer_server_id
from drivers.mysql.client import ContentRejected, Credentials, version_of
from drivers.mysql.options import MysqlOptions, parse_url

COPY_CHUNK = 1 << 20


class MysqlDriver(Driver, PitrDrill, IncrementalBackup):
    methods = DESCRIPTOR.methods
    log_namings = DESCRIPTOR.log_namings
    # mariadbd and the dump keep about 1.4 of 2 cores busy: zstd at nice 10 fits in the rest
    # and never slows the dump (bench/mysql.py, 2 GiB: 1.07 of a plain dump; 1.18 at "normal").
    default_cpu_priority = "low"
    options_model = MysqlOptions
    #: Scratch servers run as the OS user of the production server (never root).
    scratch_users = ("mysql",)

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.options.endpoint, self.options.password_file)

    @property
    def timeout(self) -> float:
        return self.context.settings.timeout.total_seconds()

    # ---- backup ----------------------------------------------------------------------

    def backup(self, method: str, sink: StreamSink) -> BackupResult:
        return self._backup(method, sink)

    def backup_incremental(self, method: str, sink: StreamSink, backup_type: str,
                           chain: list[Manifest]) -> BackupResult:
        """Pages changed since the parent's ``to_lsn`` (``mariadb-backup --incremental-lsn``)."""
        parent = chain[-1]
        return self._backup(method, sink, physical.parent_lsn(parent.backup_id, parent.metadata))

    def parent_problem(self, chain: list[Manifest]) -> str | None:
        """A parent no longer in the server's history (the server restored to an earlier point since): a full."""
        try:
            increment = physical.parent_lsn(chain[-1].backup_id, chain[-1].metadata)
        except DriverError:
            return None  # backup_incremental refuses it, naming why
        conn = self.credentials.connect()
        try:
            info = logical.server_info(conn)
            if info.key != increment.server:
                return None  # refused, naming both servers: the job may be pointed at the wrong server
            return physical.continuity_problem(conn, increment, info.log_bin)
        finally:
            conn.close()

    def _backup(self, method: str, sink: StreamSink, increment: physical.Increment | None = None) -> BackupResult:
        opts = self.options
        with self.credentials.defaults_file(self.context.spool_dir) as defaults:
            if method == "physical":
                result = physical.take_backup(self.credentials, str(defaults), self.context.spool_dir, sink,
                                              self.timeout, opts.databases, opts.exclude_databases, increment)
                versions = {"mariadb-backup": result["version"]}
            else:
                result = logical.take_dump(self.credentials, opts.databases, opts.exclude_databases, sink,
                                           str(defaults), self.timeout)
                versions = {"mysqldump": version_of("dump")}
        metadata = result["metadata"]
        versions["server"] = metadata["server_version"]
        position = metadata.get("binlog")
        pitr = None
        if self.context.settings.archive_logs and position:
            pitr = PitrStart("binlog", f"{metadata['server']}/{position['file']}", utcnow())
        return BackupResult(metadata=metadata, row_counts=result["row_counts"], tool_versions=versions, pitr=pitr)

    # ---- choosing and planning a restore ----------------------------------------------

    def _wanted_method(self, request: RestoreRequest) -> str:
        return "logical" if restore_to.is_url(request.to) else "physical"

    def check_to(self, request: RestoreRequest) -> None:
        takes = "a directory (physical backups) or a mysql:// URL (logical backups)"
        if restore_to.is_url(request.to):
            restore_to.url(request.to, "mysql", ("mysql", "mariadb"), takes)
        else:
            restore_to.directory(request.to, "mysql", takes=takes)

    def check_target(self, manifest: Manifest, request: RestoreRequest) -> None:
        if manifest.method == "physical":
            _check_datadir(Path(request.to).expanduser(), request.force)
            return
        endpoint = parse_url(request.to, what="--to", default_user=self.options.endpoint.user)
        target = Credentials(endpoint, request.password_file or self.options.password_file)
        tables = {load.parse_table(t, manifest.row_counts) for t in request.tables}
        load.prepare_target(target, manifest.metadata.get("databases", []), tables,
                            force=request.force or request.clean, clean=False)  # only looks

    def choose_backup(self, manifests: Sequence[Manifest], request: RestoreRequest, backup_id: str | None) -> Manifest:
        job = self.context.job
        method = self._wanted_method(request)
        if backup_id:
            chosen = super().choose_backup(manifests, RestoreRequest(to=request.to), backup_id)
            if chosen.method != method:
                raise UsageError(f"backup {backup_id} is {chosen.method}: restore it --to "
                                 f"{'a mysql:// URL' if chosen.method == 'logical' else 'a directory'}")
            return chosen
        candidates = [m for m in manifests if m.method == method]
        if not candidates:
            kind = "a mysql:// URL restores logical" if method == "logical" else "a directory restores physical"
            raise BackupNotFound(f"no {method} backups for job {job}", hint=f"--to {kind} backups")
        target = request.target
        if target is None:
            return max(candidates, key=lambda m: m.finished_at)
        with_pitr = [m for m in candidates if m.metadata.get("pitr") and m.metadata.get("binlog")]
        if not with_pitr:
            raise UsageError(f"no {method} backup of job {job} has archived binlogs; a --target-{target.kind} needs "
                             f"archive_logs = true")
        eligible = [m for m in with_pitr if _before(m, target)]
        if not eligible:
            oldest = min(with_pitr, key=lambda m: m.finished_at)
            raise UsageError(f"--target-{target.kind} {target.value} is before the oldest usable backup "
                             f"{oldest.backup_id} ({_describe_position(oldest)})")
        return max(eligible, key=lambda m: m.finished_at)

    def describe_restore(self, manifest: Manifest, request: RestoreRequest) -> list[str]:
        lines = [f"restore {manifest.method} backup {manifest.backup_id} (taken {format_timestamp(manifest.finished_at)},"
                 f" {_describe_position(manifest)}) to {request.to}"]
        if request.tables:
            lines.append(f"only tables: {', '.join(request.tables)}")
        if not self._replays(manifest, request):
            lines.append("no binlog replay (" + ("--table restores the dump only" if request.tables
                                                 else "the backup has no archived binlogs") + ")")
            return lines
        chain = pitr.chain_from(pitr.archived_files(self.binlog_archive(), manifest.metadata["server"]),
                                manifest.metadata["binlog"]["file"])
        plan = pitr.plan_replay(chain, manifest, request.target, to_gap=request.to_gap)  # refuses as restore would
        lines.append(f"binlogs ({len(plan.files)}): " + ", ".join(f.object for f in plan.files))
        lines.append(f"one mysqlbinlog from {plan.files[0].name}:{plan.start_position} into one client: {plan.describe}")
        return lines

    def _replays(self, manifest: Manifest, request: RestoreRequest) -> bool:
        if request.tables:
            if request.target is not None:
                raise UsageError("--table restores the dump only; it cannot be combined with a --target-*")
            return False
        return bool(manifest.metadata.get("pitr") and manifest.metadata.get("binlog"))

    # ---- restore ------------------------------------------------------------------------

    def restore(self, source: BackupSource, request: RestoreRequest) -> str:
        manifest = source.manifest
        replays = self._replays(manifest, request)
        with self._work_dir("restore") as work:
            fetched, plan = self._fetch_binlogs(source, request, work) if replays else ({}, None)
            if manifest.method == "physical":
                return self._restore_physical(source, request, work, fetched, plan)
            return self._restore_logical(source, request, fetched, plan)

    def _restore_logical(self, source: BackupSource, request: RestoreRequest, fetched: dict[str, Path],
                         plan: pitr.ReplayPlan | None) -> str:
        manifest = source.manifest
        endpoint = parse_url(request.to, what="--to", default_user=self.options.endpoint.user)
        target = Credentials(endpoint, request.password_file or self.options.password_file)
        tables = {load.parse_table(t, manifest.row_counts) for t in request.tables}
        load.prepare_target(target, manifest.metadata.get("databases", []), tables, force=request.force,
                            clean=request.clean)
        with target.defaults_file(self.context.spool_dir) as defaults:
            started = time.monotonic()
            with source.open(logical.STREAM) as stream:
                size = load.load_dump(target, str(defaults), stream, tables)
            loaded = time.monotonic() - started
            message = (f"restored backup {manifest.backup_id} of {manifest.job} to {endpoint}: "
                       f"dump loaded ({size} bytes) in {loaded:.1f}s")
            if plan is not None:
                started = time.monotonic()
                pitr.replay(plan, fetched, str(defaults), self.timeout)
                message += (f", {len(plan.files)} binlog file(s) replayed in {time.monotonic() - started:.1f}s "
                            f"({plan.describe})")
        return message

    def _restore_physical(self, source: BackupSource, request: RestoreRequest, work: Path, fetched: dict[str, Path],
                          plan: pitr.ReplayPlan | None) -> str:
        if request.tables:
            raise UsageError("a physical backup restores the whole server; --table needs a logical backup")
        dest = Path(request.to).expanduser().absolute()
        _check_datadir(dest, request.force)
        if plan is not None:  # the roll-forward's scratch server works beside dest: fail before the copy if it cannot
            scratch.require_reachable(dest, self.scratch_user())
        # The copy is extracted, prepared and rolled forward beside dest and only then moved
        # there: a failed restore leaves nothing that looks like a data directory.
        staging = physical.staging_dir(dest)
        increments = [physical.staging_dir(dest) for _ in range(2)]
        try:
            physical.restore_chain(_chain_streams(source), staging, increments, self.timeout)
            coordinates = physical.binlog_info(staging) or source.manifest.metadata.get("binlog") or {}
            if plan is not None:
                self._replay_into_copy(staging, plan, fetched, work)
            physical.install(staging, dest)
        finally:
            for path in (staging, *increments):
                scratch.remove(path)
        message = f"restored backup {source.manifest.backup_id} of {source.manifest.job} to {dest} (prepared)"
        if plan is not None:
            message += f"; replayed {len(plan.files)} binlog file(s) ({plan.describe})"
        elif coordinates:
            message += f"; binlog position {coordinates.get('file')}:{coordinates.get('position')}"
        owner = "mysql" if os.geteuid() == 0 else None
        if owner:
            message += f"; before starting it: chown -R {owner}:{owner} {dest}"
        return message

    def _replay_into_copy(self, datadir: Path, plan: pitr.ReplayPlan, fetched: dict[str, Path], work: Path) -> None:
        """Binlogs applied to a prepared copy by a scratch server on it (sandboxed; the client connects over its socket)."""
        rundir = Path(tempfile.mkdtemp(prefix="backupd-mysql-run-"))
        try:
            with self._scratch_server(datadir, rundir, ["--skip-grant-tables", "--skip-log-bin"]) as server:
                with server.credentials.defaults_file(work) as defaults:
                    pitr.replay(plan, fetched, str(defaults), self.timeout)
        finally:
            scratch.remove(rundir)

    def _scratch_server(self, datadir: Path, rundir: Path, extra: list[str]) -> scratch.MariadbScratch:
        return scratch.MariadbScratch(datadir, rundir, self.scratch_sandbox, extra)

    def _fetch_binlogs(self, source: BackupSource, request: RestoreRequest, work: Path
                       ) -> tuple[dict[str, Path], pitr.ReplayPlan]:
        """Fetch (and decrypt) every binlog the replay needs BEFORE the target is touched."""
        manifest = source.manifest
        archive = source.logs("binlog")
        chain = pitr.chain_from(pitr.archived_files(archive, manifest.metadata["server"]),
                                manifest.metadata["binlog"]["file"])
        plan = pitr.plan_replay(chain, manifest, request.target, to_gap=request.to_gap)
        directory = work / "binlog"
        directory.mkdir(mode=0o700)
        fetched: dict[str, Path] = {}
        for item in plan.files:
            path = directory / item.name
            with source.open_log("binlog", item.object) as reader, open(path, "wb") as out:
                while chunk := reader.read(COPY_CHUNK):
                    out.write(chunk)
            fetched[item.name] = path
        if chain.missing or (request.target is not None and request.target.kind == "gtid"):
            # with the files at hand: a GTID's place, and how far replay before a gap really reaches
            plan = pitr.plan_replay(chain, manifest, request.target, fetched, to_gap=request.to_gap)
        return fetched, plan

    @contextlib.contextmanager
    def _work_dir(self, what: str) -> Iterator[Path]:
        path = Path(tempfile.mkdtemp(prefix=f"mysql-{what}-", dir=self.context.spool_dir))
        try:
            yield path
        finally:
            scratch.remove(path)

    # ---- verify ---------------------------------------------------------------------------

    def verify(self, source: BackupSource, scratch_dir: Path, checks_sql: list[str]) -> VerifyOutcome:
        manifest = source.manifest
        outcome = VerifyOutcome()
        with _content_judged(), self._loaded_scratch(source, scratch_dir, outcome) as server:
            found = checks.count_tables(server.credentials, manifest)
            if manifest.row_counts:
                outcome.row_counts = found
            outcome.steps.append({"step": "count rows", "tables": len(found), "counts": found,
                                  "note": manifest.metadata.get("row_counts_note", "")})
            outcome.checks.extend(checks.run_user_checks(server.credentials, manifest, checks_sql))
        return outcome

    def pitr_drill(self, source: BackupSource, scratch_dir: Path, target: RestoreTarget) -> VerifyOutcome:
        """The backup loaded into a throwaway mariadbd, binlogs replayed to ``target``, then queried."""
        manifest = source.manifest
        if not (manifest.metadata.get("pitr") and manifest.metadata.get("binlog")):
            raise UsageError(f"backup {manifest.backup_id} has no archived binlogs: a PITR drill needs "
                             "archive_logs = true")
        outcome = VerifyOutcome()
        work = scratch_dir / "binlogs"
        work.mkdir(mode=0o700)
        started = time.monotonic()
        fetched, plan = self._fetch_binlogs(source, RestoreRequest(to=str(scratch_dir), target=target), work)
        outcome.steps.append({"step": "fetch binlogs", "files": len(plan.files), "seconds": _since(started)})
        with _content_judged(), self._loaded_scratch(source, scratch_dir, outcome) as server:
            started = time.monotonic()
            with server.credentials.defaults_file(scratch_dir) as defaults:
                pitr.replay(plan, fetched, str(defaults), self.timeout)
            outcome.steps.append({"step": "replay binlogs", "files": len(plan.files), "plan": plan.describe,
                                  "seconds": _since(started)})
            outcome.checks.extend(checks.run_user_checks(
                server.credentials, manifest, ["SELECT 1", *self.context.settings.verify.checks]))
        return outcome

    @contextlib.contextmanager
    def _loaded_scratch(self, source: BackupSource, scratch_dir: Path, outcome: VerifyOutcome
                        ) -> Iterator[scratch.MariadbScratch]:
        """A throwaway mariadbd under ``scratch_dir``/server holding the backup; stopped on the way out.

        The server runs sandboxed as the scratch user, which must reach its directories:
        ``scratch_dir`` and ``server`` are opened to it for traversal (not listing).
        """
        manifest = source.manifest
        base = scratch_dir / "server"
        base.mkdir(mode=0o700)
        if self.scratch_user() is not None:
            for path in (scratch_dir, base):
                path.chmod(0o711)
        datadir, rundir = base / "data", base / "run"
        started = time.monotonic()
        extra = ["--skip-log-bin"]
        if manifest.method == "physical":  # the copy's files are hostile too: unpacked and prepared sandboxed
            # the copy and its increments in one directory, one mount in the sandbox: applying an increment
            # moves a tablespace created or rebuilt since the parent (CREATE, TRUNCATE, ALTER) into the copy
            # by rename(2), which fails between two bind mounts (EXDEV) even on one filesystem
            copy = base / "copy"
            datadir, increments = copy / "data", [copy / "increment-a", copy / "increment-b"]
            for path in (copy, datadir, *increments):
                path.mkdir(mode=0o700)
            sandbox = self.scratch_sandbox([copy])
            scratch.give_to(sandbox.user, [copy, datadir, *increments])
            chain = _chain_streams(source)
            size = physical.restore_chain(chain, datadir, increments, self.timeout, sandbox)
            extra.append("--skip-grant-tables")
            prepared: dict[str, Any] = {"step": "extract+prepare", "bytes": size, "seconds": _since(started)}
            if len(chain) > 1:
                prepared["chain"] = [backup_id for backup_id, _ in chain]
            outcome.steps.append(prepared)
        else:
            scratch.install_db(datadir, self.scratch_sandbox)
        with self._scratch_server(datadir, rundir, extra) as server:
            outcome.steps.append({"step": "start scratch mariadbd", "seconds": _since(started)})
            if manifest.method == "logical":
                step = time.monotonic()
                with server.credentials.defaults_file(base) as defaults, \
                        source.open(logical.STREAM) as stream:
                    size = load.load_dump(server.credentials, str(defaults), stream, set())
                outcome.steps.append({"step": "load dump", "bytes": size, "seconds": _since(step)})
            yield server

    # ---- logs and checks --------------------------------------------------------------------

    def binlog_archive(self) -> LogArchive:
        if self.context.logs is None:
            raise DriverError("no log archive is available to this driver context")
        return self.context.logs("binlog")

    def log_archivers(self) -> list[LogArchiver]:
        if not self.context.settings.archive_logs or self.context.logs is None:
            return []
        return [BinlogArchiver(
            self.context.job, self.credentials, self.context.logs("binlog"), self.context.spool_dir / "binlog",
            self.options.binlog_flush_interval.total_seconds(),
            streamer_server_id(self.context.job, self.options.binlog_server_id),
        )]

    def log_reach(self, source: BackupSource) -> LogReach | None:
        return pitr.reach(source.logs("binlog"), source.manifest)

    def extend_reach(self, manifest: Manifest, recorded: LogReach, checkpoint: str,
                     tail: Sequence[LogObject]) -> LogReach | None:
        """Consecutively numbered successors of the reach's last binlog file (``pitr.extend``)."""
        return pitr.extend(manifest, recorded, checkpoint, tail)

    def check(self) -> Iterable[Check]:
        return checks.server_checks(self)


@contextlib.contextmanager
def _content_judged() -> Iterator[None]:
    """In verification, content the scratch restore rejects makes the backup bad (exit 3), not the run failed."""
    try:
        yield
    except ContentRejected as exc:
        raise IntegrityError(f"the scratch restore rejected the backup: {exc.brief}") from None
    except BackupNotFound as exc:  # the manifest names no stream of the kind its method writes
        raise IntegrityError(str(exc)) from None


def _chain_streams(source: BackupSource) -> list[tuple[str, Callable[[], BinaryIO]]]:
    """(backup id, opener of its physical stream) for each backup of the source's chain, full first."""
    return [(m.backup_id, functools.partial(source.open_from, m.backup_id, physical.STREAM)) for m in source.chain]


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)


def _describe_position(manifest: Manifest) -> str:
    info = manifest.metadata.get("binlog") or {}
    if not info:
        return "no binlog position"
    gtid = f", GTID {info['gtid']}" if info.get("gtid") else ""
    return f"binlog {info['file']}:{info['position']}{gtid}"


def _before(manifest: Manifest, target: Any) -> bool:
    """Whether the target lies at or after this backup's consistent point."""
    info = manifest.metadata["binlog"]
    if target.kind == "time":
        snapshot = parse_timestamp(manifest.metadata.get("snapshot_at") or format_timestamp(manifest.finished_at))
        return snapshot <= target.time
    if target.kind == "position":
        name, pos = pitr.parse_position(target.value)
        return (binlog.split_name(name)[1], pos) >= (binlog.split_name(info["file"])[1], int(info["position"]))
    if target.kind == "gtid":
        try:
            domain, _, seq = binlog.parse_gtid(target.value)
        except ValueError as exc:
            raise UsageError(f"--target-gtid: {exc}") from None
        return binlog.gtid_state(info.get("gtid")).get(domain, 0) < seq
    raise UsageError(f"the mysql driver cannot restore to a --target-{target.kind} (use time, position or gtid)")


def _check_datadir(dest: Path, force: bool) -> None:
    """Refuse a physical restore over a file, or over a non-empty directory without --force."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        if not force or not dest.is_dir():
            raise DriverError(f"{dest}: exists and is not an empty directory; refusing to overwrite it",
                              hint="pass --force to replace its contents")
