"""Bytes in, the same bytes out: zstd -> age -> sha256 -> storage, on every backend."""

from __future__ import annotations

import io
import os

import pytest

from backupd.errors import DriverError, ObjectNotFound
from backupd.pipeline import CountingReader
from backupd.repository import Repository
from backupd.storage import Storage

SIZES = [0, 1, 65536, 65537, 5 * 1024 * 1024 + 17]


class ShortReads(io.RawIOBase):
    """A source that hands out odd-sized pieces, like a pipe does."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._step = 0

    def read(self, size: int = -1) -> bytes:
        self._step = self._step % 7 + 1
        n = min(len(self._data), 4093 * self._step, size if size >= 0 else len(self._data))
        out, self._data = bytes(self._data[:n]), self._data[n:]
        return out


@pytest.mark.parametrize("size", SIZES, ids=[f"{s}B" for s in SIZES])
def test_round_trip(storage: Storage, keys, size: int) -> None:
    data = os.urandom(size // 2) + b"compressible " * (size // 26) if size > 2 else os.urandom(size)
    data = data[:size].ljust(size, b"\0")
    repo = Repository(storage, "job")
    entry = repo.write_stream("20261124T020000Z", "db", ShortReads(data), [keys.identity.to_recipient()], 3)
    assert entry.raw_size == size
    assert entry.key == "db.zst.age"
    assert storage.stat("job/backups/20261124T020000Z/db.zst.age").size == entry.stored_size

    from backupd.manifest import Manifest
    from backupd.timeutil import utcnow

    manifest = Manifest("20261124T020000Z", "job", "test", "logical", utcnow(), utcnow(), [entry], {}, {})
    with repo.open_stream(manifest, "db", [keys.identity]) as stream:
        restored = b""
        while chunk := stream.read(100_000):
            restored += chunk
    assert restored == data


def test_highly_compressible_data_is_read_back_in_bounded_pieces(storage: Storage, keys) -> None:
    repo = Repository(storage, "job")
    size = 64 * 1024 * 1024
    zeros = io.BytesIO(bytes(size))
    entry = repo.write_stream("20261124T020000Z", "db", zeros, [keys.identity.to_recipient()], 3)
    assert entry.stored_size < size // 100
    from backupd.manifest import Manifest
    from backupd.timeutil import utcnow

    manifest = Manifest("20261124T020000Z", "job", "test", "logical", utcnow(), utcnow(), [entry], {}, {})
    total = 0
    with repo.open_stream(manifest, "db", [keys.identity]) as stream:
        while chunk := stream.read(1 << 20):
            assert len(chunk) <= 1 << 20
            total += len(chunk)
    assert total == size


def test_empty_dump_is_an_error_and_stores_nothing(storage: Storage, keys) -> None:
    repo = Repository(storage, "job")
    with pytest.raises(DriverError, match="stream 'db' is empty"):
        repo.write_stream("20261124T020000Z", "db", CountingReader(io.BytesIO(b""), "db"),
                          [keys.identity.to_recipient()], 3)
    with pytest.raises(ObjectNotFound):
        storage.stat("job/backups/20261124T020000Z/db.zst.age")


class FailingSource:
    def __init__(self, good: int) -> None:
        self.left = good

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            raise DriverError("pg_dump exited with status 1")
        n = min(self.left, 1 << 20)
        self.left -= n
        return os.urandom(n)


def test_source_failing_midway_leaves_no_object(storage: Storage, keys) -> None:
    repo = Repository(storage, "job")
    with pytest.raises(DriverError, match="pg_dump exited with status 1"):
        repo.write_stream("20261124T020000Z", "db", FailingSource(12 << 20), [keys.identity.to_recipient()], 1)
    assert list(storage.list("job/")) == []


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
@pytest.mark.parametrize("priority", ["low", "idle", "normal"])
def test_pipeline_threads_run_at_the_jobs_cpu_priority(keys, priority: str) -> None:
    """A backup's zstd and age threads (and zstd's own workers) yield the CPU; the caller's thread never does."""
    import threading

    from backupd.pipeline import EncodingReader

    before = set(os.listdir("/proc/self/task"))
    reader = EncodingReader(io.BytesIO(os.urandom(1 << 20) * 24), [keys.identity.to_recipient()], 3, threads=2,
                            priority=priority)  # type: ignore[arg-type]
    try:
        reader.read(1)  # data has gone through zstd and age: their threads are set up
        started = [int(tid) for tid in set(os.listdir("/proc/self/task")) - before]
        idle = [os.sched_getscheduler(tid) == os.SCHED_IDLE for tid in started]
        nice = [os.getpriority(os.PRIO_PROCESS, tid) for tid in started]
        while reader.read(1 << 20):
            pass
    finally:
        reader.close()
    assert len(started) >= 3  # zstd, age and at least one zstd worker
    assert all(idle) if priority == "idle" else not any(idle)
    if priority == "low":
        assert all(n >= 10 for n in nice), nice
    assert os.sched_getscheduler(threading.get_native_id()) != os.SCHED_IDLE
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0
    assert reader.stats.raw_size == 24 << 20
