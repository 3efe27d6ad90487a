"""Moving WAL between pg_wal and the repository: push (archive_command), push-ahead, fetch with prefetch.

``wal-push`` returns success only once a segment is durable in storage. The
push-ahead archiver (run by the daemon) pushes ``archive_status/*.ready``
segments in parallel before PostgreSQL asks, so the archive_command that follows
finds the segment already stored and returns at once. It never renames a
``.ready`` file: only PostgreSQL does that, after archive_command returned 0.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import structlog

from backupd import metrics
from backupd.errors import BackupdError, DriverError, ObjectNotFound, StorageError, UsageError
from backupd.logarchive import LogArchive, LogConflict, PushResult, file_digest
from backupd.paths import PREFETCH_LOCK
from drivers.postgres.walnames import SEGMENT_RE, archive_name, is_wal_file, next_names

log = structlog.get_logger(__name__)

DONE_MEMORY = 4096
LOCK_STRIPES = 64
SPOOL_MAX_AGE = 3600.0
PREFETCH_THREADS = 2


class WalPusher:
    """Pushes WAL files for one job; concurrent pushes of one name are serialised, repeats are free."""

    def __init__(self, archive: LogArchive, job: str) -> None:
        self.archive = archive
        self.job = job
        self._locks = [threading.Lock() for _ in range(LOCK_STRIPES)]
        self._guard = threading.Lock()
        self._done: OrderedDict[str, str] = OrderedDict()  # archive name -> plaintext sha256

    def pushed(self, name: str) -> str | None:
        with self._guard:
            return self._done.get(name)

    def _remember(self, name: str, sha256: str) -> None:
        with self._guard:
            self._done[name] = sha256
            self._done.move_to_end(name)
            while len(self._done) > DONE_MEMORY:
                self._done.popitem(last=False)

    def push(self, path: Path) -> PushResult:
        """Archive one WAL file; raise (LogConflict, StorageError...) unless it is durable in storage."""
        if not is_wal_file(path.name):
            raise UsageError(f"{path}: not a WAL segment, .partial, .backup or .history file name")
        name = archive_name(path.name)
        lock = self._locks[hash(name) % LOCK_STRIPES]
        try:
            with lock:
                try:
                    raw_size, sha256 = file_digest(path)
                except FileNotFoundError:
                    raise DriverError(f"{path}: no such file") from None
                if self.pushed(name) == sha256:
                    result = PushResult(name, "identical", raw_size, 0, sha256)
                else:
                    result = self._push(name, path, raw_size, sha256)
                    self._remember(name, sha256)
        except BaseException:
            metrics.ARCHIVE_FAILURES.labels(self.job).inc()
            raise
        metrics.ARCHIVE_LAST_SUCCESS.labels(self.job).set(time.time())
        return result

    def _push(self, name: str, path: Path, raw_size: int, sha256: str) -> PushResult:
        # Look before uploading: a retry after a crash or a push-ahead finds it stored already.
        try:
            existing = self.archive.stat(name)
        except ObjectNotFound:
            existing = None
        if existing is not None and existing.sha256 == sha256:
            return PushResult(name, "identical", raw_size, existing.stored_size, sha256)
        if existing is not None and existing.sha256 is not None:
            raise LogConflict(
                f"{existing.key}: already archived with different content (sha256 {existing.sha256[:12]}..., "
                f"this file {sha256[:12]}...); refusing to overwrite",
                hint="two clusters may be archiving into the same job; check archive_command and the job's storage",
            )
        result = self.archive.push_file(name, path, threads=0)
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
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "name": result.name, "status": result.status}


class PushAheadArchiver:
    """Pushes segments PostgreSQL has marked ready, in parallel, ahead of its archive_command."""

    def __init__(self, pusher: WalPusher, data_dir: Path, workers: int = 4, poll: float = 0.5) -> None:
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


class WalFetcher:
    """restore_command: serve a file from the spool or the archive, prefetching the next segments."""

    def __init__(self, archive: LogArchive, identities: Sequence[object], key_file: str | None,
                 spool: Path | None, prefetch: int = 8) -> None:
        self.archive = archive
        self.identities = identities
        self.key_file = key_file
        self.spool = spool
        self.prefetch = prefetch

    def _fetch_into(self, filename: str, directory: Path) -> bool:
        try:
            self.archive.fetch_to(archive_name(filename), directory / filename, self.identities, self.key_file)
            return True
        except ObjectNotFound:
            return False

    def fetch(self, filename: str, dest: Path) -> bool:
        """Write ``filename`` to ``dest``; False when the archive does not hold it.

        A segment the background prefetcher is fetching right now is waited
        for rather than fetched twice; the caller starts the next prefetch.
        """
        if not is_wal_file(filename):
            raise UsageError(f"{filename!r} is not a WAL segment, .history or .backup file name")
        spool = self._usable_spool()
        if spool is None or not SEGMENT_RE.match(filename):
            return self._direct(filename, dest)
        spooled = spool / filename
        if not spooled.exists() and not self._wait_for_prefetcher(spooled):
            if not self._fetch_into(filename, spool):
                return False
        self._deliver(spooled, dest)
        self._tidy(spool, filename)
        return True

    def prefetch_after(self, filename: str) -> int:
        """Fill the spool with the segments after ``filename`` (the background prefetcher).

        The process that starts a prefetcher takes the spool's prefetch lock
        first and hands it over, so this runs with the lock already held.
        Stops at the first segment the archive lacks.
        """
        spool = self._usable_spool()
        if spool is None or not SEGMENT_RE.match(filename):
            return 0
        segment_size = self._segment_size(filename) or 16 * 1024 * 1024
        wanted = [name for name in next_names(filename, self.prefetch, segment_size) if not (spool / name).exists()]
        fetched = 0
        with concurrent.futures.ThreadPoolExecutor(PREFETCH_THREADS) as pool:
            for found in pool.map(lambda name: self._fetch_into(name, spool), wanted):
                if not found:
                    break  # end of the archive on this timeline
                fetched += 1
        return fetched

    def _wait_for_prefetcher(self, spooled: Path, timeout: float = 120.0) -> bool:
        """True once a running prefetcher has put ``spooled`` in place; False if none is running or it did not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if spooled.exists():
                return True
            with _try_lock(spooled.parent / PREFETCH_LOCK) as free:
                if free:
                    return spooled.exists()
            time.sleep(0.02)
        return spooled.exists()

    def _direct(self, filename: str, dest: Path) -> bool:
        try:
            self.archive.fetch_to(archive_name(filename), dest, self.identities, self.key_file)
        except ObjectNotFound:
            return False
        return True

    def _segment_size(self, filename: str) -> int | None:
        try:
            info = self.archive.stat(archive_name(filename))
        except ObjectNotFound:
            return None
        return info.raw_size or 16 * 1024 * 1024

    def _usable_spool(self) -> Path | None:
        if self.spool is None:
            return None
        try:
            self.spool.mkdir(parents=True, exist_ok=True)
            probe = self.spool / f".probe-{uuid.uuid4().hex[:8]}"
            probe.touch()
            probe.unlink()
            return self.spool
        except OSError as exc:
            log.warning("wal-fetch spool unusable; fetching without prefetch", spool=str(self.spool), error=str(exc))
            return None

    @staticmethod
    def _deliver(spooled: Path, dest: Path) -> None:
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.part"
        try:
            try:
                os.replace(spooled, tmp)
            except OSError:  # another file system: copy, then drop the spooled copy
                shutil.copyfile(spooled, tmp)
                spooled.unlink()
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    @staticmethod
    def _tidy(spool: Path, served: str) -> None:
        """Drop segments replay has passed and leftovers of killed fetches."""
        now = time.time()
        for entry in os.scandir(spool):
            try:
                stale = now - entry.stat().st_mtime > SPOOL_MAX_AGE
                passed = SEGMENT_RE.match(entry.name) and entry.name[:8] == served[:8] and entry.name < served
                if stale or passed:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """Non-blocking flock on ``path``: yields whether it was acquired (and holds it while inside)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def fetch_with_retries(fetcher: WalFetcher, filename: str, dest: Path, attempts: int = 3, delay: float = 2.0) -> bool:
    """Storage outages are retried: a failure here would end recovery early."""
    for attempt in range(1, attempts + 1):
        try:
            return fetcher.fetch(filename, dest)
        except StorageError as exc:
            if attempt == attempts or isinstance(exc, ObjectNotFound):
                raise
            log.warning("wal-fetch: storage error, retrying", file=filename, attempt=attempt, error=str(exc))
            time.sleep(delay * attempt)
    return False
