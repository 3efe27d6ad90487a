"""``Copies``: one source read once into every backend; a backend that fails mid-stream gets no manifest."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from backupd.copies import Copies
from backupd.errors import ObjectNotFound, StorageError, StorageUnavailable
from backupd.pipeline import EncodingReader
from backupd.repository import Repository
from backupd.storage import Storage
from core_fixtures import Keys
from storage.filesystem import FilesystemStorage


class BreaksAfter(Storage):
    """A real backend whose connection drops after ``limit`` bytes of one put (a network error path)."""

    def __init__(self, inner: Storage, limit: int) -> None:
        self.inner, self.limit, self.location = inner, limit, inner.location

    def put(self, key, source, **kwargs):
        limit = self.limit

        class Dropping:
            sent = 0

            def read(self, size=-1):
                data = source.read(size)
                self.sent += len(data)
                if self.sent > limit:
                    raise StorageUnavailable(f"{key}: connection reset")
                return data

        return self.inner.put(key, Dropping(), **kwargs)

    def open(self, key):
        return self.inner.open(key)

    def list(self, prefix):
        return self.inner.list(prefix)

    def stat(self, key):
        return self.inner.stat(key)

    def delete(self, key):
        self.inner.delete(key)


def test_a_backend_that_drops_mid_stream_gets_no_manifest_and_the_other_commits(tmp_path: Path, keys: Keys) -> None:
    local = FilesystemStorage(tmp_path / "local")
    offsite_dir = FilesystemStorage(tmp_path / "offsite")
    copies = Copies({"local": local, "offsite": BreaksAfter(offsite_dir, 3 << 20)})
    repo = Repository(copies, "shop")
    data = os.urandom(8 << 20)
    entry = repo.write_stream("20261124T020000Z", "db", io.BytesIO(data), [keys.identity.to_recipient()], 3)
    repo.write_stream("20261124T020000Z", "small", io.BytesIO(b"x" * 100), [keys.identity.to_recipient()], 3)
    stored = (tmp_path / "local" / "shop" / "backups" / "20261124T020000Z" / "db.zst.age").read_bytes()
    assert hashlib.sha256(stored).hexdigest() == entry.sha256
    assert not (tmp_path / "offsite" / "shop" / "backups" / "20261124T020000Z" / "db.zst.age").exists()
    # skipped while it is down (RETRY_AFTER), so a dead endpoint does not slow every stream
    assert not (tmp_path / "offsite" / "shop" / "backups" / "20261124T020000Z" / "small.zst.age").exists()
    assert copies.missed("shop/backups/20261124T020000Z/manifest.json") == ["offsite"]
    copies.put("shop/backups/20261124T020000Z/manifest.json", io.BytesIO(b"{}"))
    assert (tmp_path / "local" / "shop" / "backups" / "20261124T020000Z" / "manifest.json").exists()
    assert not (tmp_path / "offsite" / "shop" / "backups" / "20261124T020000Z" / "manifest.json").exists()


def test_identical_bytes_in_each_and_one_upstream_failure_leaves_nothing(tmp_path: Path, keys: Keys) -> None:
    copies = Copies({"a": FilesystemStorage(tmp_path / "a"), "b": FilesystemStorage(tmp_path / "b")})
    reader = EncodingReader(io.BytesIO(os.urandom(5 << 20)), [keys.identity.to_recipient()], 3)
    copies.put("job/x.zst.age", reader)
    assert (tmp_path / "a" / "job" / "x.zst.age").read_bytes() == (tmp_path / "b" / "job" / "x.zst.age").read_bytes()

    class Broken:
        def __init__(self) -> None:
            self.calls = 0

        def read(self, size=-1):
            self.calls += 1
            if self.calls > 3:
                raise ValueError("the dump tool died")
            return b"y" * (1 << 20)

    with pytest.raises(ValueError, match="dump tool died"):
        copies.put("job/y.zst.age", Broken())
    for name in ("a", "b"):
        assert not (tmp_path / name / "job" / "y.zst.age").exists()
        with pytest.raises(ObjectNotFound):
            copies.stat("job/y.zst.age")


def test_min_copies_not_reached_removes_what_was_stored(tmp_path: Path) -> None:
    local = FilesystemStorage(tmp_path / "local")
    copies = Copies({"local": local, "offsite": BreaksAfter(FilesystemStorage(tmp_path / "off"), 0)}, min_copies=2)
    with pytest.raises(StorageError, match="min_copies"):
        copies.put("job/wal/seg.zst.age", io.BytesIO(b"z" * 1000))
    with pytest.raises(ObjectNotFound):
        local.stat("job/wal/seg.zst.age")
