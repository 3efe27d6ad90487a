"""A job's repositories seen as one storage: every write goes to each, reads fall back in list order.

``storage = ["local", "offsite"]`` (DESIGN.md "Copies"). ``Copies`` is a ``Storage`` over the
job's backends, so the repository, the log archive and everything above them are unchanged:

- ``put`` reads its source once (compressed and encrypted once) and streams the same bytes
  to every backend at the same time, each in its own thread with a bounded queue. A backend
  that fails is left out; the put succeeds once ``min_copies`` backends hold the object (a
  WAL segment is acknowledged only then); below that it raises and removes the object from the
  backends that took it, so a retry is not told "already archived" by too few. A backend that failed is skipped for writes for
  ``RETRY_AFTER`` seconds, so an unreachable endpoint does not slow every push down.
- A commit marker (``manifest.json`` and its ``.sig``) goes only to backends that failed no
  write under the same backup directory: a repository commits only a backup it holds whole.
- ``open``/``stat`` read from the first backend that has the object; ``list`` is the union of
  every backend's listing. ``open_object`` (a manifest's stream, with its size and sha256)
  uses the first backend whose copy is good, so a missing or corrupt object in one is read
  from another; every fallback is logged.
- ``delete`` removes from every backend; per-repository retention works on one backend at a
  time (``JobContext.for_storage``), never through this class.

The daemon's catch-up (``backupd.catchup``) copies what a lagging repository missed.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import heapq
import queue
import threading
import time
from typing import BinaryIO, Iterator

import structlog

from backupd.errors import ObjectExists, ObjectLocked, ObjectNotFound, StorageError, StorageUnavailable
from backupd.manifest import MANIFEST_NAME
from backupd.pipeline import hash_stored
from backupd.storage import Metadata, ObjectInfo, Readable, Storage

log = structlog.get_logger(__name__)

CHUNK = 1 << 20
QUEUE_CHUNKS = 8
#: Seconds a backend that failed a write is skipped for further writes (reads always try it).
RETRY_AFTER = 30.0
_EOF = b""


def _report(name: str, up: bool) -> None:
    """Every operation's outcome per storage: ``backupd_storage_up`` where this process serves metrics."""
    from backupd.jobrun import process_recorder

    process_recorder().storage_state(name, up)


def is_commit_marker(key: str) -> bool:
    """A manifest or its signature: written in a repository only once it holds the whole backup."""
    from backupd.repository import Layout  # the repository opens objects through this module

    name = key.rpartition("/")[2]
    return name in (MANIFEST_NAME, Layout.signature_beside(MANIFEST_NAME))


def _directory(key: str) -> str:
    return key.rpartition("/")[0]


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Pipe:
    """What one backend's ``put`` reads: chunks the pump feeds it, then EOF (or the source's failure)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[bytes | _Failed] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self.finished = threading.Event()  # the backend's put returned or raised: feed no more
        self._pending = b""
        self._ended = False

    def feed(self, item: bytes | _Failed) -> None:
        while not self.finished.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1, /) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        while not self._pending and not self._ended:
            item = self.queue.get()
            if isinstance(item, _Failed):
                raise item.exc
            if item == _EOF:
                self._ended = True
            self._pending = item
        data, self._pending = self._pending[:size], self._pending[size:]
        return data


class Copies(Storage):
    """The job's repositories, in order; ``min_copies`` of them must hold every write."""

    def __init__(self, backends: dict[str, Storage], min_copies: int = 1) -> None:
        if not backends:
            raise ValueError("Copies needs at least one backend")
        self.backends = dict(backends)
        self.min_copies = min_copies
        self.location = " + ".join(f"{name}={backend.location}" for name, backend in self.backends.items())
        self.deferred_metadata = all(backend.deferred_metadata for backend in self.backends.values())
        self._lock = threading.Lock()
        self._down_until: dict[str, float] = {}
        self._failed_dirs: dict[str, set[str]] = {name: set() for name in self.backends}

    # -- bookkeeping -----------------------------------------------------------
    def _up(self, name: str) -> None:
        _report(name, True)
        with self._lock:
            self._down_until.pop(name, None)

    def _down(self, name: str, exc: BaseException, key: str | None = None, *, write: bool = False) -> None:
        _report(name, False)
        with self._lock:
            if write:
                self._down_until[name] = time.monotonic() + RETRY_AFTER
                if key is not None:
                    self._failed_dirs[name].add(_directory(key))
        log.warning("storage failed; the other repositories carry on", storage=name, key=key, error=str(exc),
                    operation="write" if write else "read")

    def _writers(self, key: str) -> list[str]:
        now = time.monotonic()
        with self._lock:
            names = [name for name in self.backends if self._down_until.get(name, 0) <= now]
            if len(names) < self.min_copies:  # too few left to succeed: try them all again
                names = list(self.backends)
            if is_commit_marker(key):
                names = [name for name in names if _directory(key) not in self._failed_dirs[name]]
        return names

    def missed(self, key: str) -> list[str]:
        """Backends this process could not write under ``key``'s directory (the catch-up's work)."""
        with self._lock:
            return [name for name, dirs in self._failed_dirs.items() if _directory(key) in dirs]

    # -- writing ---------------------------------------------------------------
    def put(self, key: str, source: Readable, *, if_absent: bool = False, metadata: Metadata | None = None,
            retain_until: dt.datetime | None = None) -> ObjectInfo:
        names = self._writers(key)
        skipped = [name for name in self.backends if name not in names]
        with self._lock:
            for name in skipped:
                self._failed_dirs[name].add(_directory(key))
        pipes = {name: _Pipe() for name in names}
        results: dict[str, ObjectInfo | BaseException] = {}

        def run(name: str) -> None:
            try:
                results[name] = self.backends[name].put(key, pipes[name], if_absent=if_absent, metadata=metadata,
                                                        retain_until=retain_until)
            except BaseException as exc:  # noqa: BLE001 - judged below, in the caller's thread
                results[name] = exc
            finally:
                pipes[name].finished.set()

        threads = [threading.Thread(target=run, args=(name,), name=f"put-{name}", daemon=True) for name in names]
        for thread in threads:
            thread.start()
        upstream: BaseException | None = None
        try:
            while True:
                live = [pipe for pipe in pipes.values() if not pipe.finished.is_set()]
                if not live:
                    break
                try:
                    chunk = source.read(CHUNK)
                except BaseException as exc:
                    upstream = exc
                    for pipe in live:
                        pipe.feed(_Failed(exc))
                    break
                for pipe in live:
                    pipe.feed(chunk)
                if not chunk:
                    break
        finally:
            for thread in threads:
                thread.join()
        if upstream is not None:
            raise upstream
        return self._settle(key, results, skipped)

    def _settle(self, key: str, results: dict[str, ObjectInfo | BaseException], skipped: list[str]) -> ObjectInfo:
        stored = {name: r for name, r in results.items() if isinstance(r, ObjectInfo)}
        exists = [name for name, r in results.items() if isinstance(r, ObjectExists)]
        failures: dict[str, BaseException] = {}
        for name, result in results.items():
            if isinstance(result, ObjectInfo) or isinstance(result, ObjectExists):
                self._up(name)
            elif isinstance(result, StorageError) and not isinstance(result, ObjectLocked):
                self._down(name, result, key, write=True)
                failures[name] = result
            else:
                raise result  # not the storage's fault: a bug or an interrupt
        if len(stored) + len(exists) < self.min_copies:
            held = ", ".join([*stored, *exists]) or "none"
            first = next(iter(failures.values()), None)
            self._undo(key, list(stored))
            raise StorageUnavailable(
                f"{key}: stored in {len(stored) + len(exists)} of the {self.min_copies} repositories min_copies "
                f"requires (held by: {held}; failed: {', '.join(failures) or '-'}; "
                f"skipped while down: {', '.join(skipped) or '-'})"
                + (f": {first}" if first else ""),
                hint="the daemon copies what a repository missed once it is back; `backupd copy` does it by hand") \
                from first
        if exists:
            raise ObjectExists(f"{key}: already stored in {', '.join(exists)}")
        return next(iter(stored.values()))

    def _undo(self, key: str, names: builtins.list[str]) -> None:
        """A put that failed leaves nothing (the storage contract): remove what fewer than min_copies got,
        so a retry pushes it again rather than finding it "already archived" in too few repositories."""
        for name in names:
            try:
                self.backends[name].delete(key)
            except StorageError as exc:
                log.warning("could not remove an object stored in too few repositories", storage=name, key=key,
                            error=str(exc))

    def delete(self, key: str) -> None:
        locked: ObjectLocked | None = None
        failed: list[StorageError] = []
        for name, backend in self.backends.items():
            try:
                backend.delete(key)
                self._up(name)
            except ObjectLocked as exc:
                locked = exc
            except StorageError as exc:
                self._down(name, exc, key)
                failed.append(exc)
        if locked is not None:
            raise locked
        if len(failed) == len(self.backends):
            raise failed[0]

    def sweep(self, prefix: str, *, remove: bool = True) -> builtins.list[str]:
        found: builtins.list[str] = []
        for name, backend in self.backends.items():
            try:
                found.extend(f"{name}: {item}" for item in backend.sweep(prefix, remove=remove))
            except StorageError as exc:
                self._down(name, exc)
        return found

    def can_lock(self) -> bool:
        """Whether any repository may hold objects under a retention (one that cannot say is assumed to)."""
        for backend in self.backends.values():
            try:
                if backend.can_lock():
                    return True
            except StorageError:
                return True
        return False

    # -- reading ---------------------------------------------------------------
    def _first(self, key: str, what: str, call: str) -> tuple[str, object]:
        """The first backend's answer to ``call(key)``; ObjectNotFound when none has it."""
        problems: dict[str, StorageError] = {}
        for name, backend in self.backends.items():
            try:
                answer = getattr(backend, call)(key)
            except ObjectNotFound as exc:
                self._up(name)
                problems[name] = exc
                continue
            except StorageError as exc:
                self._down(name, exc, key)
                problems[name] = exc
                continue
            self._up(name)
            if problems:
                log.warning(f"{what} read from another repository", key=key, storage=name,
                            missing_in=", ".join(f"{n} ({type(e).__name__})" for n, e in problems.items()))
            return name, answer
        if any(isinstance(exc, ObjectNotFound) for exc in problems.values()):  # not where it could be looked for
            unreachable = [name for name, exc in problems.items() if not isinstance(exc, ObjectNotFound)]
            raise ObjectNotFound(f"{key}: in none of the repositories ({', '.join(self.backends)})"
                                 + (f"; not reachable: {', '.join(unreachable)}" if unreachable else ""))
        raise StorageUnavailable(f"{key}: not readable from any repository: "
                                 + "; ".join(f"{n}: {e}" for n, e in problems.items()))

    def open(self, key: str) -> BinaryIO:
        return self._first(key, "object", "open")[1]  # type: ignore[return-value]

    def stat(self, key: str) -> ObjectInfo:
        return self._first(key, "object", "stat")[1]  # type: ignore[return-value]

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        listings: builtins.list[builtins.list[ObjectInfo]] = []
        problems: builtins.list[str] = []
        for name, backend in self.backends.items():
            try:
                listings.append(builtins.list(backend.list(prefix)))
                self._up(name)
            except StorageError as exc:
                self._down(name, exc)
                problems.append(f"{name}: {exc}")
        if not listings:
            raise StorageUnavailable(f"listing {prefix}: no repository answered: {'; '.join(problems)}")
        last = None
        for info in heapq.merge(*listings, key=lambda item: item.key):
            if info.key != last:
                yield info
            last = info.key

    def open_checked(self, key: str, size: int, sha256: str) -> BinaryIO:
        """The first copy whose size and sha256 are the expected ones; if none is, the first that exists
        (whose reader then reports what is wrong with it)."""
        problems: builtins.list[str] = []
        first: str | None = None
        answered = False
        for name, backend in self.backends.items():
            try:
                with contextlib.closing(backend.open(key)) as handle:
                    got = hash_stored(handle)
            except ObjectNotFound:
                answered = True
                problems.append(f"{name}: missing")
                continue
            except StorageError as exc:
                self._down(name, exc, key)
                problems.append(f"{name}: {exc}")
                continue
            self._up(name)
            first = first or name
            if got != (size, sha256):
                problems.append(f"{name}: corrupt (size or sha256 differs from the manifest's)")
                continue
            if problems:
                log.warning("object read from another repository", key=key, storage=name,
                            problems="; ".join(problems))
            return backend.open(key)
        if first is None and not answered:
            raise StorageUnavailable(f"{key}: not readable from any repository ({'; '.join(problems)})")
        if first is None:
            raise ObjectNotFound(f"{key}: in none of the repositories ({'; '.join(problems)})")
        return self.backends[first].open(key)

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()


def open_object(storage: Storage, key: str, size: int, sha256: str) -> BinaryIO:
    """A backup object's stored bytes; with several repositories, from the first whose copy is good."""
    if isinstance(storage, Copies):
        return storage.open_checked(key, size, sha256)
    return storage.open(key)

