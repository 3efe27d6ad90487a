"""Log objects (WAL, binlog, oplog): durable, never silently overwritten, readable back."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from backupd.logarchive import LogArchive, LogConflict
from backupd.storage import Storage


def test_metadata_travels_with_the_object(storage: Storage) -> None:
    storage.put("a/with-meta", io.BytesIO(b"x" * 10), metadata={"sha256": "ab" * 32, "raw-size": "10"})
    assert storage.stat("a/with-meta").metadata == {"sha256": "ab" * 32, "raw-size": "10"}
    storage.put("a/plain", io.BytesIO(b"y"))
    assert not storage.stat("a/plain").metadata
    assert [info.key for info in storage.list("a/")] == ["a/plain", "a/with-meta"]
    storage.delete("a/with-meta")
    assert [info.key for info in storage.list("a/")] == ["a/plain"]


@pytest.fixture
def segment(tmp_path: Path) -> Path:
    path = tmp_path / "000000010000000000000003"
    path.write_bytes(os.urandom(1 << 20) + bytes(3 << 20))
    return path


def test_push_fetch_round_trip(storage: Storage, keys, segment: Path, tmp_path: Path) -> None:
    archive = LogArchive(storage, "orders", "wal", [keys.identity.to_recipient()])
    result = archive.push_file("00000001/000000010000000000000003", segment)
    assert result.status == "stored" and result.raw_size == segment.stat().st_size
    # DESIGN.md: 256 segments a folder
    assert storage.stat("orders/wal/00000001/0000000100000000/000000010000000000000003.zst.age").size == \
        result.stored_size
    [listed] = archive.list(with_metadata=True)
    assert listed.name == "00000001/000000010000000000000003" and listed.sha256 == result.sha256
    dest = tmp_path / "fetched"
    assert archive.fetch_to(listed.name, dest, [keys.identity]) == segment.stat().st_size
    assert dest.read_bytes() == segment.read_bytes()


def test_same_content_again_succeeds_other_content_is_refused(storage: Storage, keys, segment: Path,
                                                               tmp_path: Path) -> None:
    archive = LogArchive(storage, "orders", "wal", [keys.identity.to_recipient()])
    name = "00000001/000000010000000000000003"
    archive.push_file(name, segment)
    assert archive.push_file(name, segment).status == "identical"
    other = tmp_path / "other"
    other.write_bytes(os.urandom(1000))
    with pytest.raises(LogConflict, match="already archived with different content"):
        archive.push_file(name, other)
    dest = tmp_path / "check"
    archive.fetch_to(name, dest, [keys.identity])
    assert dest.read_bytes() == segment.read_bytes()


def test_partial_objects_can_be_replaced(storage: Storage, keys, tmp_path: Path) -> None:
    archive = LogArchive(storage, "db", "binlog", [keys.identity.to_recipient()])
    growing = tmp_path / "mysql-bin.000007"
    growing.write_bytes(b"first part")
    archive.push_file("1/mysql-bin.000007", growing, replace=True)
    growing.write_bytes(b"first part, then more")
    assert archive.push_file("1/mysql-bin.000007", growing, replace=True).status == "replaced"
    with archive.open("1/mysql-bin.000007", [keys.identity]) as reader:
        assert reader.read() == b"first part, then more"


class _Source:
    """Bytes in pieces, remembering whether it was read to its end."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.ended = False

    def read(self, size: int = -1) -> bytes:
        chunk = self._data.read(min(size, 1 << 20) if size and size > 0 else 1 << 20)
        self.ended = self.ended or not chunk
        return chunk


@pytest.mark.parametrize("size", [1000, 12 << 20])  # one request, and (on S3, 5 MiB parts) a multipart upload
def test_deferred_metadata_is_asked_for_as_late_as_possible(storage: Storage, size: int) -> None:
    assert storage.deferred_metadata
    source = _Source(os.urandom(size))
    asked: list[bool] = []

    def metadata() -> dict[str, str]:
        asked.append(source.ended)
        return {"sha256": "cd" * 32}

    storage.put("d/object", source, metadata=metadata)
    assert storage.stat("d/object").metadata == {"sha256": "cd" * 32}
    multipart = storage.location.startswith("s3://") and size > 5 << 20
    assert asked == [not multipart], "metadata must be asked for once, after the source ended where possible"


@pytest.mark.parametrize("size", [3 << 20, 24 << 20])  # encoded at once; streamed (S3: multipart)
def test_digest_streamed_with_the_upload_is_the_files(storage: Storage, keys, tmp_path: Path, size: int) -> None:
    import hashlib

    path = tmp_path / "000000010000000000000004"
    path.write_bytes(os.urandom(size // 2) + bytes(size - size // 2))
    archive = LogArchive(storage, "orders", "wal", [keys.identity.to_recipient()], level=1)
    result = archive.push_file("00000001/000000010000000000000004", path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert result.sha256 == expected and result.raw_size == size
    assert archive.stat("00000001/000000010000000000000004").sha256 == expected
    assert archive.push_file("00000001/000000010000000000000004", path).status == "identical"
