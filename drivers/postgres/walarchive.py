"""Moving WAL from pg_wal to the repository: push (archive_command) and push-ahead.

``wal-push`` returns success only once a segment is durable in storage. The
push-ahead archiver (run by the daemon) pushes ``archive_status/*.ready``
segments in parallel before PostgreSQL asks, so the archive_command that follows
finds the segment already stored and returns at once. It never renames a
``.ready`` file: only PostgreSQL does that, after archive_command returned 0.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import structlog

from backupd import pushes
from backupd.control import confine
from backupd.errors import BackupdError, DriverError, ObjectNotFound, UsageError
from backupd.logarchive import LogArchive, PushResult, conflict, file_digest
from backupd.served_metrics import served
from drivers.postgres.walnames import archive_name, is_wal_file

log = structlog.get_logger(__name__)

DONE_MEMORY = 4096
LOCK_STRIPES = 64
Identity = tuple[int, int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    """Which file, at which version: a WAL file PostgreSQL has not touched since has the same bytes."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def system_identifier(data_dir: Path) -> int | None:
    """The cluster's system identifier (the first 8 bytes of global/pg_control); None when unreadable."""
    try:
        with open(data_dir / "global" / "pg_control", "rb") as handle:
            head = handle.read(8)
    except OSError:
        return None
    return int.from_bytes(head, "little") if len(head) == 8 else None


def segment_system_identifier(path: Path) -> int | None:
    """The system identifier in a WAL segment's long page header (offset 24); None when it has none."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(40)
    except OSError:
        return None
    if len(head) < 32 or not int.from_bytes(head[2:4], "little") & XLP_LONG_HEADER:
        return None
    return int.from_bytes(head[24:32], "little")


XLP_LONG_HEADER = 0x0002


class WalPusher:
    """Pushes WAL files for one job; concurrent pushes of one name are serialised, repeats are free.

    Only the job's own cluster may push: the file must lie in the job's ``data_dir``
    (PostgreSQL hands ``pg_wal/...`` relative to it) and a segment must carry that
    cluster's system identifier. A restored copy or another cluster that runs
    ``backupd wal-push --job`` this job is refused, so it can never add timelines
    or segments to this job's archive.
    """

    def __init__(self, archive: LogArchive, job: str, data_dir: Path | None = None, archive_logs: bool = True) -> None:
        self.archive = archive
        self.job = job
        self.data_dir = data_dir
        self.archive_logs = archive_logs
        self._locks = [threading.Lock() for _ in range(LOCK_STRIPES)]
        self._guard = threading.Lock()
        #: archive name -> (plaintext sha256, identity of the file it was read from)
        self._done: OrderedDict[str, tuple[str, Identity | None]] = OrderedDict()

    def pushed(self, name: str) -> str | None:
        with self._guard:
            done = self._done.get(name)
        return done[0] if done else None

    def _remember(self, name: str, sha256: str, source: Identity | None) -> None:
        with self._guard:
            self._done[name] = (sha256, source)
            self._done.move_to_end(name)
            while len(self._done) > DONE_MEMORY:
                self._done.popitem(last=False)

    def check_origin(self, path: Path) -> None:
        """UsageError unless ``path`` is a WAL file of this job's own cluster."""
        if not self.archive_logs:
            raise UsageError(f"job {self.job} does not archive WAL (archive_logs = false); refusing {path.name}",
                             hint=f"set jobs.{self.job}.archive_logs = true, or point archive_command at the right job")
        if self.data_dir is None:
            raise UsageError(f"job {self.job} names no data_dir, so it cannot tell its cluster's WAL from another's",
                             hint=f"set jobs.{self.job}.data_dir to the cluster's data directory")
        try:
            confine(os.path.abspath(path), self.data_dir)
        except ValueError as exc:
            raise UsageError(f"{path} is not in job {self.job}'s data directory {self.data_dir} ({exc}): WAL of "
                             "another cluster (a restored copy?) is never archived into this job",
                             hint="a restored copy should run with archive_mode = off or its own job") from None
        if is_segment_name(path.name):
            ours = system_identifier(self.data_dir)
            theirs = segment_system_identifier(path)
            if ours is not None and theirs is not None and ours != theirs:
                raise UsageError(f"{path.name} belongs to the cluster with system identifier {theirs}, not job "
                                 f"{self.job}'s ({ours}, data_dir {self.data_dir}); refusing it")

    def push(self, path: Path) -> PushResult:
        """Archive one WAL file; raise (LogConflict, StorageError...) unless it is durable in storage."""
        if not is_wal_file(path.name):
            raise UsageError(f"{path}: not a WAL segment, .partial, .backup or .history file name")
        self.check_origin(path)
        name = archive_name(path.name)
        lock = self._locks[hash(name) % LOCK_STRIPES]
        try:
            with lock:
                try:
                    before = identity(os.stat(path))
                    with self._guard:
                        done = self._done.get(name)
                    if done is not None and done[1] == before:  # pushed from this very file: no need to read it
                        return self._succeeded(PushResult(name, "identical", before[2], 0, done[0]))
                    result = self._push(name, path)
                    unchanged = identity(os.stat(path)) == before
                except FileNotFoundError:
                    raise DriverError(f"{path}: no such file") from None
                self._remember(name, result.sha256, before if unchanged else None)
        except BaseException as exc:
            pushes.failed(self.job, exc)
            raise
        return self._succeeded(result)

    def _succeeded(self, result: PushResult) -> PushResult:
        pushes.succeeded(self.job)
        return result

    def _push(self, name: str, path: Path) -> PushResult:
        # Look before uploading: a retry after a crash or a push-ahead finds it stored already.
        try:
            existing = self.archive.stat(name)
        except ObjectNotFound:
            existing = None
        digest = None
        if existing is not None:
            digest = file_digest(path)
            raw_size, sha256 = digest
            if existing.sha256 == sha256:
                return PushResult(name, "identical", raw_size, existing.stored_size, sha256)
            if existing.sha256 is not None:
                raise conflict(existing.key, existing.sha256, sha256)
        result = self.archive.push_file(name, path, threads=0, digest=digest)  # new: hashed as it streams
        log.info("wal archived", job=self.job, name=name, status=result.status, raw=result.raw_size,
                 stored=result.stored_size)
        return result

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        """Control-socket handler for ``{"op": "wal-push", "job": J, "path": P}``."""
        job = message.get("job")
        if job is not None and job != self.job:
            return {"ok": False, "error": f"this handler archives job {self.job}, not {job}"}
        path = message.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            return {"ok": False, "error": f"wal-push needs an absolute path (got {path!r})"}
        try:
            result = self.push(Path(path))
        except BackupdError as exc:
            log.warning("wal-push refused", path=path, error=str(exc))
            return {"ok": False, "error": str(exc)}
        log.info("wal-push answered", name=result.name, status=result.status)
        return {"ok": True, "name": result.name, "status": result.status}


def is_segment_name(filename: str) -> bool:
    return len(filename) == 24 and all(c in "0123456789ABCDEF" for c in filename)


class PushAheadArchiver:
    """Pushes segments PostgreSQL has marked ready, in parallel, ahead of its archive_command."""

    def __init__(self, pusher: WalPusher, data_dir: Path, workers: int = 4, poll: float = 0.1) -> None:
        self.pusher = pusher
        self.data_dir = data_dir
        self.workers = workers
        self.poll = poll
        self.name = f"wal-push-ahead:{pusher.job}"
        self._retry_after: dict[str, float] = {}

    @property
    def status_dir(self) -> Path:
        return self.data_dir / "pg_wal" / "archive_status"

    def ready(self) -> list[tuple[str, float]]:
        """(file name, mtime of its .ready marker); history files first, as PostgreSQL orders them."""
        found = []
        try:
            entries = list(os.scandir(self.status_dir))
        except FileNotFoundError:
            raise DriverError(f"{self.status_dir}: not found; is data_dir the cluster's data directory?") from None
        except PermissionError:
            raise DriverError(f"{self.status_dir}: permission denied; run the daemon as the cluster's OS user") from None
        for entry in entries:
            if entry.name.endswith(".ready") and is_wal_file(entry.name[:-6]):
                with contextlib.suppress(FileNotFoundError):
                    found.append((entry.name[:-6], entry.stat().st_mtime))
        found.sort(key=lambda item: (not item[0].endswith(".history"), item[0]))
        return found

    def _push_one(self, filename: str) -> None:
        if not (self.status_dir / f"{filename}.ready").exists():
            return  # PostgreSQL archived it meanwhile
        self.pusher.push(self.data_dir / "pg_wal" / filename)

    def run_once(self, pool: concurrent.futures.Executor, pending: dict[str, concurrent.futures.Future]) -> None:
        ready = self.ready()
        now = time.time()
        oldest = min((mtime for _, mtime in ready), default=None)
        if metrics := served():
            metrics.ARCHIVE_LAG.labels(self.pusher.job).set(max(0.0, now - oldest) if oldest else 0.0)
        for filename, _ in ready:
            name = archive_name(filename)
            if filename in pending or self.pusher.pushed(name) or self._retry_after.get(filename, 0) > now:
                continue
            pending[filename] = pool.submit(self._push_one, filename)
        for filename, future in list(pending.items()):
            if not future.done():
                continue
            del pending[filename]
            exc = future.exception()
            if exc is None:
                self._retry_after.pop(filename, None)
            else:
                self._retry_after[filename] = now + 5.0
                log.warning("push-ahead failed; archive_command will retry", job=self.pusher.job, file=filename,
                            error=str(exc))

    def run(self, stop: threading.Event) -> None:
        pending: dict[str, concurrent.futures.Future] = {}
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="wal-push") as pool:
            try:
                while not stop.is_set():
                    self.run_once(pool, pending)
                    stop.wait(self.poll)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
