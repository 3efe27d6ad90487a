"""Redis: RDB snapshots over the replication protocol; restore as dump.rdb; verify in a scratch server.

Key counts per database come from parsing the RDB stream itself as it is
stored (not from INFO keyspace, which moves while the snapshot is taken), so
they describe exactly the snapshot in the repository.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from backupd import restore_to
from backupd.driver import (BackupResult, BackupSource, Check, Driver, RestoreRequest, StreamSink,
                            VerifyOutcome)
from backupd.errors import DriverError, IntegrityError, UsageError
from backupd.manifest import Manifest
from backupd.settings import read_secret_file
from backupd.usercheck import Answer, judge
from drivers.redis import DESCRIPTOR
from drivers.redis.options import RedisOptions
from drivers.redis.rdb import MAX_DATABASE, RdbFormatError, RdbSummary, RdbUnsupported
from drivers.redis.resp import Connection, Endpoint, RedisReplyError, TlsFiles, parse_dsn
from drivers.redis.scratch import scratch_server, server_version
from drivers.redis.transfer import RdbTransfer, StreamingParser, TeeReader

STREAM = "rdb"
DUMP_NAME = "dump.rdb"
COPY_CHUNK = 1 << 20
AUX_KEPT = ("redis-ver", "redis-bits", "ctime", "used-mem", "repl-id", "repl-offset", "aof-base")


class RedisDriver(Driver):
    methods = DESCRIPTOR.methods
    options_model = RedisOptions
    scratch_users = ("redis",)

    # ---- connecting -------------------------------------------------------------------

    @property
    def endpoint(self) -> Endpoint:
        endpoint = parse_dsn(self.options.dsn)
        if self.options.password_file is not None:
            password = read_secret_file(self.options.password_file, f"jobs.{self.context.job}.password_file")
            endpoint = Endpoint(host=endpoint.host, port=endpoint.port, path=endpoint.path, tls=endpoint.tls,
                                username=endpoint.username, password=password, db=endpoint.db)
        return endpoint

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.options.tls_ca_file, self.options.tls_cert_file, self.options.tls_key_file)

    @contextlib.contextmanager
    def connect(self, endpoint: Endpoint | None = None) -> Iterator[Connection]:
        conn = Connection(endpoint or self.endpoint, timeout=self.options.read_timeout,
                          connect_timeout=self.options.connect_timeout, tls=self.tls)
        try:
            conn.authenticate()
            yield conn
        finally:
            conn.close()

    # ---- backup -----------------------------------------------------------------------

    def backup(self, method: str, sink: StreamSink) -> BackupResult:
        with self.connect() as conn:
            server = conn.info("server")
            version = server.get("redis_version", "unknown")
            self.log.info("requesting an RDB snapshot over replication", server=conn.where, redis_version=version)
            transfer = RdbTransfer.start(conn)
            parser = StreamingParser()
            try:
                entry = sink(STREAM, TeeReader(transfer, parser))
            finally:
                summary, problem = _finish(parser)
        if entry.raw_size != transfer.received:
            raise DriverError(f"{conn.where}: stored {entry.raw_size} bytes of a {transfer.received}-byte RDB")
        if transfer.info.announced_size is not None and transfer.received != transfer.info.announced_size:
            raise DriverError(f"{conn.where}: RDB transfer ended after {transfer.received} of "
                              f"{transfer.info.announced_size} bytes")
        if isinstance(problem, RdbUnsupported):
            self.log.warning("RDB stored, but key counts are unavailable", reason=str(problem))
        elif problem is not None:
            raise DriverError(f"{conn.where}: the RDB snapshot is malformed: {problem}")
        metadata: dict[str, Any] = {
            "server": conn.where,
            "redis_version": version,
            "redis_mode": server.get("redis_mode", ""),
            "transfer": transfer.info.form,
            "replication_id": transfer.info.replication_id,
            "replication_offset": transfer.info.offset,
            "rdb_bytes": transfer.received,
        }
        counts: dict[str, int] = {}
        if summary is not None:
            counts = summary.key_counts()
            metadata.update({
                "rdb_version": summary.version,
                "rdb_crc64": summary.checksum,
                "aux": {k: v for k, v in summary.aux.items() if k in AUX_KEPT},
                "keys_with_ttl": {f"db{db}": n for db, n in sorted(summary.expires.items())},
                "functions": summary.functions,
                "key_counts": "parsed from the RDB stream",
            })
        else:
            metadata["key_counts"] = f"unavailable: {problem}"
        return BackupResult(metadata=metadata, row_counts=counts, tool_versions={"redis-server": version})

    # ---- restore ----------------------------------------------------------------------

    def _target(self, request: RestoreRequest) -> Path:
        if request.tables:
            raise UsageError("the redis driver restores whole datasets; --table is not supported")
        return restore_to.directory(request.to, "redis", DUMP_NAME) / DUMP_NAME

    def check_to(self, request: RestoreRequest) -> None:
        self._target(request)

    def check_target(self, manifest: Manifest, request: RestoreRequest) -> None:
        dest = self._target(request)
        if dest.exists() and not request.force:
            raise DriverError(f"{dest}: file exists; refusing to overwrite it", hint="pass --force to replace it")

    def describe_restore(self, manifest: Manifest, request: RestoreRequest) -> list[str]:
        dest = self._target(request)
        keys = ", ".join(f"{db}={n}" for db, n in manifest.row_counts.items()) or "no keys"
        lines = [f"write backup {manifest.backup_id} (Redis {manifest.metadata.get('redis_version', '?')}, "
                 f"{manifest.raw_size} bytes, {keys}) to {dest}"]
        if dest.exists():
            lines.append(f"{dest} exists: " + ("it will be replaced (--force)" if request.force else
                                               "the restore will refuse to overwrite it without --force"))
        return lines

    def restore(self, source: BackupSource, request: RestoreRequest) -> str:
        self.check_target(source.manifest, request)
        dest = self._target(request)
        dest.parent.mkdir(parents=True, exist_ok=True)
        manifest = source.manifest
        tmp = dest.parent / f".{DUMP_NAME}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            size, summary = _write_rdb(source, tmp, DriverError)
            _check_counts(manifest, summary)
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        lines = [f"restored backup {manifest.backup_id} of {manifest.job} to {dest} ({size} bytes, "
                 + (", ".join(f"{db}={n} keys" for db, n in summary.key_counts().items()) or "no keys") + ")",
                 "start Redis on it (AOF off, or it would load the AOF instead of this file):",
                 f"  redis-server --dir {shlex.quote(str(dest.parent))} --dbfilename {DUMP_NAME} --appendonly no",
                 "then, to turn AOF back on from the loaded data: redis-cli CONFIG SET appendonly yes",
                 f"{DUMP_NAME} is private (0600, owned by the user that ran this restore): "
                 "chown it to the user redis-server runs as"]
        return "\n".join(lines)

    # ---- verify -----------------------------------------------------------------------

    def verify(self, source: BackupSource, scratch: Path, checks: list[str]) -> VerifyOutcome:
        """Load the RDB into a sandboxed scratch redis-server; a refused RDB is an IntegrityError."""
        size, summary = _write_rdb(source, scratch / DUMP_NAME, IntegrityError)
        outcome = VerifyOutcome(steps=[{"step": "restore", "bytes": size, "rdb_version": summary.version}])
        outcome.steps.append({"step": "scratch server", "redis_server": server_version(self.options.redis_server)})
        # Capped by the parser; a file it could not read to the end may use any database it allows.
        databases = max(summary.keys, default=0) + 1 if summary.complete else MAX_DATABASE + 1
        with scratch_server(self, scratch, DUMP_NAME, databases, self.options.load_timeout) as (endpoint, _):
            with Connection(endpoint, timeout=self.options.read_timeout) as conn:
                keyspace = conn.info("keyspace")
            outcome.row_counts = {db: int(_keyspace_field(value, "keys")) for db, value in keyspace.items()}
            outcome.checks.append(Check("load into redis-server", True, f"{sum(outcome.row_counts.values())} keys"))
            outcome.checks.extend(run_checks(endpoint, checks, self.options.read_timeout))
        return outcome

    # ---- check ------------------------------------------------------------------------

    def check(self) -> Iterable[Check]:
        try:
            endpoint = self.endpoint
            with self.connect(endpoint) as conn:
                server = conn.info("server")
                who = f"as user {endpoint.username}" if endpoint.username else (
                    "with a password" if endpoint.password is not None else "without a password")
                yield Check("redis connection", True, f"{conn.where}: connected {who}")
                yield Check("redis server", True, f"Redis {server.get('redis_version', '?')} "
                                                  f"({server.get('redis_mode', '?')})")
                yield from _delay_check(conn)
        except DriverError as exc:
            yield Check("redis connection", False, str(exc))
        try:
            yield Check("redis-server (for verify)", True, server_version(self.options.redis_server))
        except DriverError as exc:
            yield Check("redis-server (for verify)", False, str(exc), warning=True)


def _finish(parser: StreamingParser) -> tuple[RdbSummary | None, RdbFormatError | None]:
    try:
        return parser.finish(), None
    except RdbFormatError as exc:
        return None, exc


def _write_rdb(source: BackupSource, dest: Path, error: type[DriverError | IntegrityError]) -> tuple[int, RdbSummary]:
    """Decrypt the stored RDB into ``dest`` (0600, fsynced), parsing it on the way; ``error`` if malformed."""
    parser = StreamingParser()
    size = 0
    try:
        with source.open(STREAM) as stream, os.fdopen(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                                                      "wb") as out:
            while chunk := stream.read(COPY_CHUNK):
                out.write(chunk)
                parser.feed(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
    finally:
        summary, problem = _finish(parser)
    if problem is not None and not isinstance(problem, RdbUnsupported):
        raise error(f"backup {source.manifest.backup_id}: the stored RDB is malformed: {problem}")
    return size, summary or RdbSummary(complete=False)


def _check_counts(manifest: Manifest, summary: RdbSummary) -> None:
    if manifest.row_counts and summary.keys and summary.key_counts() != manifest.row_counts:
        raise DriverError(f"restored RDB holds {summary.key_counts()} keys, the manifest says {manifest.row_counts}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keyspace_field(value: str, name: str) -> str:
    for pair in value.split(","):
        key, _, field = pair.partition("=")
        if key == name:
            return field
    return "0"


def parse_check(text: str) -> tuple[int, list[str]]:
    """``[-n DB] COMMAND ARGS...`` with redis-cli's quoting -> (db, argv)."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"cannot parse: {exc}") from None
    db = 0
    if words[:1] == ["-n"]:
        if len(words) < 2 or not words[1].isdigit():
            raise ValueError("-n needs a database number")
        db, words = int(words[1]), words[2:]
    if not words:
        raise ValueError("no command")
    return db, words


def run_checks(endpoint: Endpoint, checks: list[str], timeout: float) -> list[Check]:
    """Each check is a Redis command; the core judges its reply (nil, 0, "", "0" and [] fail)."""
    answers = []
    for text in checks:
        try:
            db, argv = parse_check(text)
        except ValueError as exc:
            answers.append(Answer(text, error=str(exc)))
            continue
        try:
            with Connection(endpoint, timeout=timeout) as conn:
                conn.command("SELECT", db)
                reply = conn.command(*argv)
        except RedisReplyError as exc:
            answers.append(Answer(text, error=f"error: {exc}"))
            continue
        except DriverError as exc:
            answers.append(Answer(text, error=str(exc)))
            continue
        answers.append(Answer(text, reply, shown=_show(reply)))
    return [judge(answer) for answer in answers]


SHOWN = 200  #: characters of a failing check's reply kept in the report (the reply is restored content)


def _show(reply: object) -> str:
    if isinstance(reply, bytes):
        text = repr(reply.decode(errors="replace"))
    elif reply is None:
        text = "nil"
    else:
        text = repr(reply)
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


def _delay_check(conn: Connection) -> Iterator[Check]:
    try:
        reply = conn.command("CONFIG", "GET", "repl-diskless-sync-delay")
    except RedisReplyError:
        return  # CONFIG is often not granted to a backup user; nothing to say
    if isinstance(reply, list) and len(reply) == 2 and reply[1].isdigit() and int(reply[1]) > 0:
        yield Check("repl-diskless-sync-delay", True,
                    f"{int(reply[1])} s: each backup waits this long before the transfer starts", warning=True)
