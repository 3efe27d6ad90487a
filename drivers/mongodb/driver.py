"""MongoDB: mongodump archives streamed from stdout, oplog slices for PITR, mongorestore to restore.

On a replica set the dump runs with ``--oplog``, so it is consistent at the
last oplog entry it captured; that entry's timestamp, read from the archive as
it streams past, is where oplog replay for PITR begins. Document counts per
collection are counted in the same pass, so they describe the stored dump.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, cast
from urllib.parse import quote, urlsplit

from backupd import restore_to
from backupd.driver import (BackupResult, BackupSource, Check, Driver, LogReach, RestoreRequest,
                            StreamSink, VerifyOutcome)
from backupd.errors import DriverError, IntegrityError, UsageError
from backupd.logarchive import LogObject
from backupd.manifest import Manifest, PitrStart
from backupd.redact import redact
from backupd.sandbox import chown_to
from backupd.scratch import ScratchServer
from backupd.settings import read_secret_file
from backupd.tool import DEVNULL, PIPE, Tool, find_tool
from backupd.timeutil import format_timestamp, parse_timestamp
from backupd.usercheck import Answer, judge
from drivers.mongodb import DESCRIPTOR, tools
from drivers.mongodb.archive import ArchiveCounter, ArchiveFormatError, ArchiveSummary, CountingStream, parse_archive
from drivers.mongodb.oplog import OplogArchiver, OplogSource, Slice, list_slices, ts_datetime, ts_text
from drivers.mongodb.plan import RestorePlan, make_plan, write_oplog
from drivers.mongodb.plan import extend as plan_extend, reach as plan_reach
from drivers.mongodb.options import SCHEMES, MongodbOptions
from drivers.mongodb.server import MongoServer

STREAM = "archive"
#: The scratch mongod's WiredTiger cache (GB, mongod's least): its default, half the host's memory
#: less 1 GB, would compete with the production server beside it.
SCRATCH_CACHE_GB = "0.25"


def _user_collections(counts: dict[str, int]) -> dict[str, int]:
    return {ns: n for ns, n in sorted(counts.items())
            if ns.split(".", 1)[0] not in ("admin", "local", "config") and ".system." not in f".{ns.split('.', 1)[-1]}"}


class MongodbDriver(Driver):
    methods = DESCRIPTOR.methods
    log_namings = DESCRIPTOR.log_namings
    options_model = MongodbOptions
    scratch_users = ("mongodb",)

    # ---- connection -----------------------------------------------------------------

    def password(self, override: Path | None = None) -> str | None:
        path = override or self.options.password_file
        if path is None:
            return None
        return read_secret_file(path, "--password-file" if override else f"jobs.{self.context.job}.password_file")

    def server(self) -> MongoServer:
        return MongoServer(self.options.dsn, self.password())

    # ---- backup -----------------------------------------------------------------------

    def backup(self, method: str, sink: StreamSink) -> BackupResult:
        password = self.password()
        spool = self.context.spool_dir
        with MongoServer(self.options.dsn, password) as server:
            version = server.version()
            replica_set = server.replica_set()
            before = server.newest_oplog_ts() if replica_set else None
            if self.context.settings.archive_logs and not replica_set:
                self.log.warning("archive_logs is on but the server is not a replica set member: no oplog, no PITR")
            with tools.config_file(spool, self.options.dsn, password) as config:
                argv = tools.dump_argv(config, oplog=bool(replica_set))
                with Tool(argv) as dump:
                    counter = ArchiveCounter()
                    stream = CountingStream(dump, counter)  # a failed exit raises inside the sink's read loop
                    try:
                        entry = sink(STREAM, stream)
                        dump.check()
                    finally:
                        try:
                            summary: ArchiveSummary | None = counter.finish()
                            problem: ArchiveFormatError | None = None
                        except ArchiveFormatError as exc:
                            summary, problem = None, exc
            if stream.size == 0:
                raise DriverError("mongodump exited with status 0 but wrote no archive to stdout")
            if entry.raw_size != stream.size:
                raise DriverError(f"stored {entry.raw_size} bytes of a {stream.size}-byte mongodump archive")
            if summary is None:
                raise DriverError(f"mongodump's output is not a complete archive: {problem}")
        consistent = summary.last_oplog_ts or before
        metadata: dict[str, Any] = {
            "server": redact(self.options.dsn),
            "mongodb_version": version,
            "replica_set": replica_set,
            "oplog": bool(replica_set),
            "databases": self.options.databases or "all",
            "archive_bytes": stream.size,
            "archive_header": {k: v for k, v in summary.header.items() if isinstance(v, (str, int))},
            "oplog_entries_in_dump": summary.oplog_entries,
        }
        pitr = None
        if consistent is not None:
            metadata["oplog_from"] = ts_text(consistent)
            metadata["consistent_at"] = format_timestamp(ts_datetime(consistent))
            if self.context.settings.archive_logs:
                pitr = PitrStart("oplog", self._first_log(consistent), ts_datetime(consistent))
        return BackupResult(metadata=metadata, row_counts=_user_collections(summary.counts), pitr=pitr,
                            tool_versions={"mongodump": tools.tool_version("mongodump"), "mongodb": version})

    def _first_log(self, since: Any) -> str:
        """The name every needed slice sorts at or after: the newest slice starting at or before ``since``."""
        if self.context.logs is None:
            return ts_text(since)
        starting = [s for s in list_slices(self.context.logs("oplog")) if (s.first.time, s.first.inc) <= (since.time, since.inc)]
        return starting[-1].name if starting else ts_text(since)

    # ---- PITR -------------------------------------------------------------------------

    def choose_backup(self, manifests: Sequence[Manifest], request: RestoreRequest, backup_id: str | None) -> Manifest:
        target = request.target
        if backup_id or target is None or target.time is None:
            return super().choose_backup(manifests, request, backup_id)
        if target.kind != "time":
            raise UsageError(f"driver mongodb cannot restore to a --target-{target.kind}")

        def consistent(m: Manifest) -> Any:
            text = m.metadata.get("consistent_at")
            return parse_timestamp(text) if text else m.finished_at

        eligible = [m for m in manifests if consistent(m) <= target.time]
        if not eligible:
            return super().choose_backup(manifests, request, backup_id)  # names the oldest restorable time
        return max(eligible, key=consistent)

    def plan(self, source_logs: Any, manifest: Manifest, request: RestoreRequest) -> RestorePlan:
        slices = list_slices(source_logs) if source_logs is not None else []
        target = request.target.time if request.target else None
        return make_plan(manifest, slices, target, request.tables, to_gap=request.to_gap)

    def describe_restore(self, manifest: Manifest, request: RestoreRequest) -> list[str]:
        self.check_to(request)
        logs = self.context.logs("oplog") if self.context.logs else None
        return self.plan(logs, manifest, request).describe(redact(request.to))

    def log_reach(self, source: BackupSource) -> LogReach | None:
        return plan_reach(source.manifest, list_slices(source.logs("oplog")))

    def extend_reach(self, manifest: Manifest, recorded: LogReach, checkpoint: str,
                     tail: Sequence[LogObject]) -> LogReach | None:
        """The slices that follow the reach's last one without a break (``plan.extend``)."""
        return plan_extend(recorded, checkpoint, tail)

    def log_archivers(self) -> list[Any]:
        if not self.context.settings.archive_logs or self.context.logs is None:
            return []
        return [_ConnectedArchiver(self)]

    # ---- restore ----------------------------------------------------------------------

    def check_to(self, request: RestoreRequest) -> None:
        restore_to.url(request.to, "mongodb", SCHEMES)
        parts = urlsplit(request.to)
        if parts.password is not None:
            raise UsageError("--to must not carry a password; use --password-file")
        for name in request.tables:
            if "." not in name.strip("."):
                raise UsageError(f"--collection must name db.collection (got {name!r})")

    def restore(self, source: BackupSource, request: RestoreRequest) -> str:
        self.check_to(request)
        plan = self.plan(source.logs("oplog"), source.manifest, request)
        password = self.password(request.password_file)
        spool = self.context.spool_dir
        with tools.config_file(spool, request.to, password) as config:
            argv = tools.restore_argv(config, oplog_replay=plan.replay_dump_oplog, namespaces=plan.namespaces,
                                      drop=request.clean, jobs=request.jobs)
            sent = _restore_archive(argv, source)
            replayed = _replay_oplog(plan, source, config, spool) if plan.replays else 0
        manifest = source.manifest
        lines = [f"restored backup {manifest.backup_id} of {manifest.job} to {redact(request.to)} "
                 f"({sent} archive bytes)" + (f", only {', '.join(plan.namespaces)}" if plan.namespaces else "")]
        if plan.replays:
            what = " and ".join(part for part in (
                "the dump's own oplog (filtered to those namespaces by backupd)" if plan.filter_dump_oplog else "",
                f"{len(plan.slices)} archived slice(s)" if plan.slices else "") if part)
            lines.append(f"replayed {replayed} oplog entries from {what}"
                         + (f" up to --oplogLimit={plan.oplog_limit}" if plan.limit else ""))
        return "\n".join(lines)

    # ---- verify -----------------------------------------------------------------------

    def verify(self, source: BackupSource, scratch: Path, checks: list[str]) -> VerifyOutcome:
        """mongorestore into a sandboxed scratch mongod; an archive it refuses is an IntegrityError."""
        outcome = VerifyOutcome()
        with scratch_mongod(self, scratch) as uri:
            with tools.config_file(scratch, uri, None) as config:
                try:
                    sent = _restore_archive(tools.restore_argv(config), source)
                except DriverError as exc:
                    raise IntegrityError(f"the scratch restore refused the archive: {exc}") from None
            outcome.steps.append({"step": "mongorestore", "bytes": sent})
            with MongoServer(uri, None) as server:
                outcome.row_counts = _user_collections(server.count_documents())
                outcome.checks.extend(run_checks(server, checks))
        return outcome

    # ---- check ------------------------------------------------------------------------

    def check(self) -> Iterable[Check]:
        for tool in ("mongodump", "mongorestore"):
            try:
                yield Check(tool, True, tools.tool_version(tool))
            except DriverError as exc:
                yield Check(tool, False, str(exc))
        try:
            with self.server() as server:
                version = server.version()
                replica_set = server.replica_set()
                yield Check("mongodb connection", True, f"{server.where}: MongoDB {version}")
                if replica_set:
                    oldest, newest = server.oldest(), server.newest_oplog_ts()
                    window = (f", oplog window {format_timestamp(ts_datetime(oldest))} to "
                              f"{format_timestamp(ts_datetime(newest))}") if oldest and newest else ""
                    yield Check("replica set", True, f"{replica_set}{window}")
                else:
                    yield Check("replica set", not self.context.settings.archive_logs,
                                "not a replica set member: dumps are not point-in-time consistent and there is "
                                "no oplog for archive_logs", warning=not self.context.settings.archive_logs)
        except DriverError as exc:
            yield Check("mongodb connection", False, str(exc))
        found = shutil.which(self.options.mongod)  # a name or a path
        if found is None:
            yield Check("mongod (for verify)", False, f"{self.options.mongod}: not found on PATH", warning=True)
        else:
            yield Check("mongod (for verify)", True, found)


def _restore_archive(argv: list[str], source: BackupSource) -> int:
    with Tool(argv, stdin=PIPE, stdout=DEVNULL) as restore:
        with source.open(STREAM) as stream:
            sent = restore.feed(stream)
        restore.check(what="restoring the archive")
    if sent != source.manifest.object(STREAM).raw_size:
        raise DriverError(f"sent {sent} of {source.manifest.object(STREAM).raw_size} archive bytes to mongorestore")
    return sent


def _replay_oplog(plan: RestorePlan, source: BackupSource, config: Path, spool: Path) -> int:
    """mongorestore --oplogReplay of one oplog.bson that backupd assembled (and filtered to the plan's namespaces)."""
    directory = Path(tempfile.mkdtemp(prefix="oplog-replay-", dir=spool))
    try:
        dump_oplog = directory / "dump-oplog.bson"
        if plan.filter_dump_oplog:
            with open(dump_oplog, "wb") as out, source.open(STREAM) as stream:
                try:
                    parse_archive(lambda: stream.read(1 << 20), on_oplog=out.write)
                except ArchiveFormatError as exc:
                    raise IntegrityError(f"backup {source.manifest.backup_id}: the stored archive: {exc}") from None
        with open(dump_oplog, "rb") if plan.filter_dump_oplog else contextlib.nullcontext() as dumped:
            count = write_oplog(plan, lambda name: source.open_log("oplog", name), directory / "oplog.bson", dumped)
        dump_oplog.unlink(missing_ok=True)
        if count == 0:
            return 0
        argv = tools.restore_argv(config, archive=False, oplog_replay=True, oplog_limit=plan.oplog_limit,
                                  directory=directory)
        with Tool(argv, stdout=DEVNULL) as replay:
            replay.check(what="replaying the oplog")
        return count
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_checks(server: MongoServer, checks: list[str]) -> list[Check]:
    """``db.collection [JSON filter]``: passes when at least one document matches."""
    answers = []
    for text in checks:
        ns, _, query = text.strip().partition(" ")
        db, _, coll = ns.partition(".")
        try:
            filter_ = json.loads(query) if query.strip() else {}
            if not db or not coll or not isinstance(filter_, dict):
                raise ValueError("expected `db.collection {\"field\": value}`")
            found = server._call("check", lambda: server.client[db][coll].count_documents(filter_, limit=1))
            answers.append(Answer(text, found, shown=f"{found} matching documents"))
        except (ValueError, DriverError) as exc:
            answers.append(Answer(text, error=str(exc)))
    return [judge(answer) for answer in answers]


@contextlib.contextmanager
def scratch_mongod(driver: MongodbDriver, scratch: Path) -> Iterator[str]:
    """A one-off mongod under ``scratch``, in the sandbox, reached on its unix socket; yields its URI.

    Inside the sandbox's private network namespace its TCP port is unreachable from the host (a
    free port is still chosen, for ``verify.sandbox = "off"``); backupd, pymongo and mongorestore
    connect through the socket, which mongod names ``<prefix>/mongodb-<port>.sock``.
    """
    path = find_tool(driver.options.mongod, hint="install mongod, or set the job's mongod option")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dbpath = scratch / "mongod"
    dbpath.mkdir()
    sock_dir = Path(tempfile.mkdtemp(prefix="backupd-mongod-"))  # short: unix socket paths max ~107 bytes
    try:
        for owned in (scratch, sock_dir):
            chown_to(owned, driver.scratch_user())
        binary = Path(path).resolve()
        readable = list(driver.options.mongod_readable) + ([] if binary.is_relative_to("/usr") else [binary.parent])
        sandbox = driver.scratch_sandbox([scratch, sock_dir], readable)
        uri = f"mongodb://{quote(str(sock_dir / f'mongodb-{port}.sock'), safe='')}/?directConnection=true"
        argv = [path, "--dbpath", str(dbpath), "--port", str(port), "--bind_ip", "127.0.0.1",
                "--logpath", str(scratch / "mongod.log"), "--unixSocketPrefix", str(sock_dir),
                "--wiredTigerCacheSizeGB", SCRATCH_CACHE_GB]
        with ScratchServer("mongod", argv, sandbox, ready=lambda: _answers(uri), log=scratch / "mongod.log"):
            yield uri
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def _answers(uri: str) -> bool:
    try:
        with MongoServer(uri, None, timeout_ms=500) as server:
            server.version()
        return True
    except DriverError:
        return False


class _ConnectedArchiver:
    """The daemon's oplog archiver: connects, then runs an OplogArchiver until stopped."""

    def __init__(self, driver: MongodbDriver) -> None:
        self.driver = driver
        self.name = f"oplog:{driver.context.job}"

    def run(self, stop: threading.Event) -> None:
        driver = self.driver
        with driver.server() as server:
            source = cast(OplogSource, server)  # its raw documents are OplogEntry (bytes and item access)
            archiver = OplogArchiver(driver.context.job, driver.context.logs("oplog"), source,  # type: ignore[misc]
                                     driver.context.spool_dir, interval=driver.options.oplog_interval,
                                     max_bytes=driver.options.oplog_slice_max_bytes, log=driver.log)
            archiver.run(stop)


__all__ = ["MongodbDriver", "MongodbOptions", "Slice"]
