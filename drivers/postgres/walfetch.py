"""restore_command's full path and the background prefetcher that keeps replay fed from the spool.

PostgreSQL asks for one WAL file at a time and replays nothing while it waits,
so the time per request adds up over a restore. The prefetcher (a detached
``backupd wal-fetch --prefetch-from NAME``, started by ``backupd restore`` and
again by ``wal-fetch`` whenever none runs) keeps ``wal_prefetch`` segments
decrypted in the spool, finds the end of the archive before replay gets there
and answers for the files the archive lacks, so nearly every request is a
rename (``backupd.cli.quick``). The spool's files and markers are described in
``backupd.spool``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from pathlib import Path
from typing import Sequence

import structlog

from backupd import spool
from backupd.errors import ObjectNotFound, StorageError, UsageError
from backupd.logarchive import LogArchive
from drivers.postgres.walnames import (DEFAULT_SEGMENT_SIZE, archive_name, is_segment, is_wal_file, next_names,
                                      segment_name)

log = structlog.get_logger(__name__)

FETCH_THREADS = 2
POLL = 0.02
IDLE = 10.0  # leave after this long with nothing delivered
IDLE_BEFORE_FIRST = 120.0  # started by restore: PostgreSQL may take a while to start
RECHECK = 0.5  # how often the end of the archive (and the next timeline's history) is looked at again
MAX_ERRORS = 20
ASK_TIMEOUT = 5.0
SPOOL_MAX_AGE = 3600.0


class WalFetcher:
    """restore_command when the fast path could not serve: the spool, the running prefetcher, else the archive."""

    def __init__(self, archive: LogArchive, identities: Sequence[object], key_file: str | None,
                 spool_dir: Path | None) -> None:
        self.archive = archive
        self.identities = identities
        self.key_file = key_file
        self.spool_dir = spool_dir

    def fetch(self, filename: str, dest: Path) -> bool:
        """Write ``filename`` to ``dest``; False when the archive does not hold it."""
        if not is_wal_file(filename):
            raise UsageError(f"{filename!r} is not a WAL segment, .history or .backup file name")
        directory = str(self.spool_dir) if self.spool_dir is not None and self.spool_dir.is_dir() else None
        if directory is not None:
            with contextlib.suppress(OSError):
                if spool.deliver(directory, filename, str(dest)):
                    return True
                if spool.prefetcher_running(directory):
                    got = spool.ask(directory, filename, str(dest), ASK_TIMEOUT)
                    if got is True:
                        return True  # an answer of "absent" is checked against the archive below
            tidy(Path(directory))
        try:
            self.archive.fetch_to(archive_name(filename), dest, self.identities, self.key_file)
        except ObjectNotFound:
            return False
        return True


def tidy(directory: Path) -> None:
    """Drop what killed fetches and prefetchers left behind."""
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            with contextlib.suppress(OSError):
                if entry.name != spool.LOCK and now - entry.stat().st_mtime > SPOOL_MAX_AGE:
                    os.unlink(entry.path)


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


class Prefetcher:
    """Keeps ``depth`` segments of one timeline in the spool ahead of replay; runs with the spool lock held."""

    def __init__(self, archive: LogArchive, identities: Sequence[object], key_file: str | None, directory: Path,
                 depth: int, *, idle: float = IDLE, idle_before_first: float = IDLE_BEFORE_FIRST) -> None:
        self.archive = archive
        self.identities = identities
        self.key_file = key_file
        self.dir = directory
        self.depth = depth
        self.idle = idle
        self.idle_before_first = idle_before_first
        self.segment_size = DEFAULT_SEGMENT_SIZE
        self.fetched = 0
        self._mine: set[str] = set()  # files this prefetcher put in the spool
        self._markers: set[str] = set()
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._next = ""
        self._start = ""  # the window: segments from here on this timeline
        self._end: str | None = None  # first segment the archive lacks on this timeline
        self._checked = 0.0
        self._errors = 0

    # -- the loop ------------------------------------------------------------------------------
    def run(self, first: str, *, inclusive: bool = True) -> int:
        """Prefetch from ``first`` (or the segment after it) until nobody has asked for a while."""
        self._clear_leftovers()
        self.segment_size = self._segment_size(first)
        self._next = self._start = first if inclusive else self._successor(first)
        started = last_activity = time.monotonic()
        activity_mark = self._lock_mtime()
        wanted_mark = self._wanted_mtime()
        with concurrent.futures.ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="wal-prefetch") as pool:
            try:
                while True:
                    now = time.monotonic()
                    mark = self._lock_mtime()
                    consumed = {name for name in self._mine if not (self.dir / name).exists()}
                    if consumed or mark != activity_mark:
                        self._mine -= consumed
                        activity_mark, last_activity = mark, now
                    quiet = self.idle if last_activity > started else self.idle_before_first
                    if now - last_activity > quiet or not self.dir.is_dir() or self._errors > MAX_ERRORS:
                        return self.fetched
                    mark = self._wanted_mtime()
                    if mark != wanted_mark:
                        wanted_mark = mark
                        self._wanted(pool)
                    self._collect()
                    if self._end is not None and now - self._checked > RECHECK:
                        self._recheck_end()
                    if now - self._checked > RECHECK:
                        self._check_next_history()
                        self._checked = now
                    self._schedule(pool)
                    time.sleep(POLL)
            finally:
                for future in self._pending.values():
                    future.cancel()
                pool.shutdown(wait=True)
                self._collect()
                self._clean_up()

    def _schedule(self, pool: concurrent.futures.Executor) -> None:
        while self._end is None and len(self._spooled_ahead()) + len(self._pending) < self.depth:
            name = self._next
            self._next = self._successor(name)
            if (self.dir / name).exists():
                self._mine.add(name)  # spooled by an earlier prefetcher: ours to count and to clean up
            elif name not in self._pending:
                self._pending[name] = pool.submit(self._fetch, name)

    def _collect(self) -> None:
        for name, future in list(self._pending.items()):
            if not future.done():
                continue
            del self._pending[name]
            if future.cancelled():
                continue
            exc = future.exception()
            if exc is not None:
                self._errors += 1
                log.warning("prefetch failed; replay will fetch it itself", file=name, error=str(exc))
                if is_segment(name) and (self._end is None or name < self._end):
                    self._next = min(self._next, name)  # try again
                    time.sleep(min(1.0, 0.05 * self._errors))
                continue
            self._errors = 0
            if future.result():
                self.fetched += 1
                if is_segment(name) and not self._in_window(name):
                    with contextlib.suppress(OSError):
                        (self.dir / name).unlink()  # fetched for a window that has moved on
                else:
                    self._mine.add(name)
            elif is_segment(name):
                if self._in_window(name) and (self._end is None or name < self._end):
                    self._reached_end(name)
            else:
                self._mark(spool.ABSENT + name)

    def _fetch(self, name: str) -> bool:
        """Spool one archived file; False when the archive lacks it."""
        try:
            self.archive.fetch_to(archive_name(name), self.dir / name, self.identities, self.key_file)
        except ObjectNotFound:
            return False
        self._unmark(spool.ABSENT + name)
        return True

    # -- the end of the archive, timelines, requests -------------------------------------------
    def _reached_end(self, name: str) -> None:
        """``name`` is not archived: replay will stop there, and ask again for the segment before it."""
        if self._end is not None:
            self._unmark(spool.KEEP + self._predecessor(self._end))
        self._end = name
        self._next = name
        self._mark(spool.KEEP + self._predecessor(name))  # before the absent marker that ends replay
        self._mark(spool.ABSENT + name)
        self._checked = time.monotonic()

    def _recheck_end(self) -> None:
        """The archive may grow (the source still archives): look again, refresh the absent marker."""
        assert self._end is not None
        if self.archive.exists(archive_name(self._end)):
            self._unmark(spool.ABSENT + self._end)
            self._unmark(spool.KEEP + self._predecessor(self._end))
            self._end = None
        else:
            self._mark(spool.ABSENT + self._end)

    def _check_next_history(self) -> None:
        """PostgreSQL looks for the next timeline's history at the start and the end of recovery."""
        history = f"{int(self._next[:8], 16) + 1:08X}.history"
        if not self.archive.exists(archive_name(history)):
            self._mark(spool.ABSENT + history)
        else:
            self._unmark(spool.ABSENT + history)

    def _wanted(self, pool: concurrent.futures.Executor) -> None:
        """A caller waits for a file: fetch it now; a segment elsewhere moves the window there."""
        try:
            name = (self.dir / spool.WANTED).read_text().strip()
        except OSError:
            return
        if not is_wal_file(name) or name in self._pending or (self.dir / name).exists():
            return
        if is_segment(name):
            log.info("replay asked outside the prefetch window; moving it", file=name, window=self._next)
            self._move_window(name)
        self._pending[name] = pool.submit(self._fetch, name)
        if is_segment(name):
            self._next = self._successor(name)

    def _move_window(self, name: str) -> None:
        self._start = name
        for stale in [n for n in self._mine if not self._in_window(n)]:
            with contextlib.suppress(OSError):
                (self.dir / stale).unlink()
            self._mine.discard(stale)
        if self._end is not None:
            self._unmark(spool.ABSENT + self._end)
            self._unmark(spool.KEEP + self._predecessor(self._end))
        self._end = None
        self._next = self._start = name

    # -- helpers -------------------------------------------------------------------------------
    def _in_window(self, name: str) -> bool:
        return name[:8] == self._start[:8] and name >= self._start

    def _spooled_ahead(self) -> list[str]:
        keep = self._predecessor(self._end) if self._end else None
        return [name for name in self._mine if self._in_window(name) and name != keep]

    def _successor(self, name: str) -> str:
        return next_names(name, 1, self.segment_size)[0]

    def _predecessor(self, name: str) -> str:
        timeline, segno = int(name[:8], 16), self._segno(name)
        return segment_name(timeline, max(segno - 1, 0), self.segment_size)

    def _segno(self, name: str) -> int:
        per = 0x100000000 // self.segment_size
        return int(name[8:16], 16) * per + int(name[16:], 16)

    def _segment_size(self, first: str) -> int:
        try:
            info = self.archive.stat(archive_name(first))
        except (ObjectNotFound, ValueError):
            return DEFAULT_SEGMENT_SIZE
        return info.raw_size or DEFAULT_SEGMENT_SIZE

    def _lock_mtime(self) -> float:
        try:
            return (self.dir / spool.LOCK).stat().st_mtime
        except OSError:
            return 0.0

    def _wanted_mtime(self) -> int:
        try:
            return (self.dir / spool.WANTED).stat().st_mtime_ns
        except OSError:
            return 0

    def _mark(self, marker: str) -> None:
        path = self.dir / marker
        with contextlib.suppress(OSError):
            path.touch()
            self._markers.add(marker)

    def _unmark(self, marker: str) -> None:
        with contextlib.suppress(OSError):
            (self.dir / marker).unlink()
        self._markers.discard(marker)

    def _clear_leftovers(self) -> None:
        """With the lock held, nothing else writes here: markers and parts left by a killed prefetcher go."""
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.dir):
                if entry.name.startswith((spool.ABSENT, spool.KEEP)) or entry.name.endswith(".part"):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def _clean_up(self) -> None:
        """Leave nothing that would outlive us: markers, and segments nobody asked for."""
        for marker in list(self._markers):
            self._unmark(marker)
        for name in self._mine:
            with contextlib.suppress(OSError):
                (self.dir / name).unlink()
        self._mine.clear()
