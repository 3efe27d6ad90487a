"""The storage contract (backupd/storage.py), run against every backend."""

from __future__ import annotations

import io
import random

import pytest

import s3_server
from backupd.errors import ObjectExists, ObjectNotFound, StorageError
from backupd.storage import Storage
from storage.filesystem import TEMP_PREFIX, FilesystemStorage
from storage.s3 import MiB, S3Storage


class SourceFailed(Exception):
    """Raised by a test source; must reach the caller unchanged."""


class ShortReads:
    """A source that returns at most ``step`` bytes per read, like a pipe."""

    def __init__(self, data: bytes, step: int = 4099) -> None:
        self._data, self._pos, self._step = data, 0, step

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = len(self._data)
        n = min(size, self._step)
        chunk = self._data[self._pos:self._pos + n]
        self._pos += len(chunk)
        return chunk


class FailingSource:
    """Yields ``good`` bytes of data, then raises."""

    def __init__(self, good: int) -> None:
        self._left = good

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            raise SourceFailed("source broke")
        n = min(size if size >= 0 else self._left, self._left, 1 * MiB)
        self._left -= n
        return b"x" * n


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def read_all(storage: Storage, key: str) -> bytes:
    with storage.open(key) as f:
        return f.read()


def leftovers(storage: Storage) -> list[str]:
    """What a failed put may leave outside the key space: temp files, multipart uploads."""
    if isinstance(storage, FilesystemStorage):
        if not storage.root.exists():
            return []
        return [str(p) for p in storage.root.rglob("*") if p.is_file() and p.name.startswith(TEMP_PREFIX)]
    if isinstance(storage, S3Storage):
        return s3_server.dangling_uploads(storage.endpoint, storage.bucket)
    raise AssertionError(f"no leftovers check for {type(storage).__name__}")


@pytest.mark.parametrize("size", [0, 1, 65536, 65537, 12 * MiB + 12345])
def test_round_trip(storage: Storage, size: int) -> None:
    data = random_bytes(size, seed=size)
    info = storage.put("job/backups/one/base.tar.zst.age", io.BytesIO(data))
    assert info.key == "job/backups/one/base.tar.zst.age"
    assert info.size == size
    assert read_all(storage, "job/backups/one/base.tar.zst.age") == data
    assert storage.stat("job/backups/one/base.tar.zst.age").size == size


def test_open_reads_in_chunks(storage: Storage) -> None:
    data = random_bytes(300_000, seed=1)
    storage.put("k", io.BytesIO(data))
    with storage.open("k") as f:
        chunks = list(iter(lambda: f.read(65536), b""))
    assert [len(c) for c in chunks] == [65536] * 4 + [300_000 - 4 * 65536]
    assert b"".join(chunks) == data


@pytest.mark.parametrize("size", [10_000, 11 * MiB])
def test_short_reads_source(storage: Storage, size: int) -> None:
    data = random_bytes(size, seed=7)
    info = storage.put("short", ShortReads(data))
    assert info.size == size
    assert read_all(storage, "short") == data


def test_list_by_prefix(storage: Storage) -> None:
    keys = ["a/2", "a/1", "a/b/3", "ab/4", "b/5", "a-c"]
    for i, key in enumerate(keys):
        storage.put(key, io.BytesIO(b"z" * i))
    assert [o.key for o in storage.list("a/")] == ["a/1", "a/2", "a/b/3"]
    assert [o.key for o in storage.list("a")] == ["a-c", "a/1", "a/2", "a/b/3", "ab/4"]
    assert [o.key for o in storage.list("a/b/")] == ["a/b/3"]
    assert [o.key for o in storage.list("")] == sorted(keys)
    assert list(storage.list("nothing/")) == []
    assert {o.key: o.size for o in storage.list("")} == {key: i for i, key in enumerate(keys)}


def test_list_by_a_prefix_ending_inside_a_folder_name(storage: Storage) -> None:
    """A WAL folder is listed by the start of its segments' names (``Layout.log_list_prefixes``)."""
    keys = ["w/1/00010/a", "w/1/00010/b", "w/1/00011/c", "w/1/00010x", "w/1/0001.h", "w/2/00010/d"]
    for key in keys:
        storage.put(key, io.BytesIO(b"z"))
    assert [o.key for o in storage.list("w/1/00010")] == ["w/1/00010/a", "w/1/00010/b", "w/1/00010x"]
    assert [o.key for o in storage.list("w/1/0001")] == sorted(k for k in keys if k.startswith("w/1/"))


def test_stat(storage: Storage) -> None:
    storage.put("s/obj", io.BytesIO(b"12345"))
    info = storage.stat("s/obj")
    assert (info.key, info.size) == ("s/obj", 5)
    assert info.modified is not None and info.modified.tzinfo is not None


def test_delete(storage: Storage) -> None:
    storage.put("d/obj", io.BytesIO(b"data"))
    storage.delete("d/obj")
    with pytest.raises(ObjectNotFound):
        storage.open("d/obj")
    with pytest.raises(ObjectNotFound):
        storage.stat("d/obj")
    assert list(storage.list("d/")) == []


def test_delete_missing_is_fine(storage: Storage) -> None:
    storage.delete("never/was")


def test_missing_object(storage: Storage) -> None:
    with pytest.raises(ObjectNotFound):
        storage.open("no/such")
    with pytest.raises(ObjectNotFound):
        storage.stat("no/such")


def test_overwrite_replaces(storage: Storage) -> None:
    storage.put("o", io.BytesIO(b"old content"))
    storage.put("o", io.BytesIO(b"new"))
    assert read_all(storage, "o") == b"new"
    assert storage.stat("o").size == 3


@pytest.mark.parametrize("size", [100, 6 * MiB])
def test_if_absent(storage: Storage, size: int) -> None:
    storage.put("once", io.BytesIO(b"first"), if_absent=True)
    with pytest.raises(ObjectExists):
        storage.put("once", io.BytesIO(random_bytes(size)), if_absent=True)
    assert read_all(storage, "once") == b"first"
    assert leftovers(storage) == []


def test_failing_source_leaves_nothing(storage: Storage) -> None:
    with pytest.raises(SourceFailed):
        storage.put("f/obj", FailingSource(good=12 * MiB))
    with pytest.raises(ObjectNotFound):
        storage.stat("f/obj")
    assert list(storage.list("")) == []
    assert leftovers(storage) == []


def test_failing_source_keeps_old_object(storage: Storage) -> None:
    storage.put("f/obj", io.BytesIO(b"old"))
    for good in (10, 12 * MiB):
        with pytest.raises(SourceFailed):
            storage.put("f/obj", FailingSource(good=good))
    assert read_all(storage, "f/obj") == b"old"
    assert leftovers(storage) == []


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", "a/", ""])
def test_invalid_keys(storage: Storage, key: str) -> None:
    source = FailingSource(good=0)  # must not even be read
    with pytest.raises(StorageError):
        storage.put(key, source)
    with pytest.raises(StorageError):
        storage.open(key)
    with pytest.raises(StorageError):
        storage.stat(key)
    with pytest.raises(StorageError):
        storage.delete(key)
