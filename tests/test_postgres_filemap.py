"""The file engine's map is read from a repository, so it is hostile: every malformed entry is refused with
a one-line error naming the backup and the path; chunk references are merged and resolved as planned."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from backupd.errors import IntegrityError, UsageError
from backupd.manifest import Manifest
from drivers.postgres.filemap import CHUNK, FileEntry, FileMap, Part, chunk_hash, merge_parts
from drivers.postgres.filerestore import check_tablespaces, tablespaces

H = chunk_hash(b"x")


def entry(**changes: Any) -> dict[str, Any]:
    base = {"path": "base/1/1259", "size": 10, "mtime_ns": 1, "hashes": H,
            "parts": [[None, "data-00001", "base/1/1259", 0, 1, 0]]}
    return {**base, **changes}


def table(*files: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {"file_map": {"chunk_size": CHUNK, "files": list(files), "dirs": ["base"], **changes}}


def test_a_good_map_round_trips() -> None:
    files = FileMap.from_metadata(table(entry()), "backup X")
    assert files.files["base/1/1259"].parts == [Part(None, "data-00001", "base/1/1259", 0, 1, 0)]
    assert FileMap.from_metadata({"file_map": files.to_metadata()}, "again").files == files.files


@pytest.mark.parametrize("bad, message", [
    (entry(path="../../etc/passwd"), "not a plain relative path"),
    (entry(path="/etc/passwd"), "not a plain relative path"),
    (entry(path="base/./x"), "not a plain relative path"),
    (entry(path="base/1/../../../x"), "not a plain relative path"),
    (entry(size=-1), "size is not a non-negative integer"),
    (entry(size=True), "size is not a non-negative integer"),
    (entry(hashes=H + H), "expected 1 chunk checksums"),
    (entry(parts=[]), "parts cover 0 chunks of 1"),
    (entry(parts=[[None, "data-00001", "m", 1, 1, 0]]), "do not cover its chunks in order"),
    (entry(parts=[["x", "o", "m", 0, 1]]), "not a list of six"),
    (entry(parts=[[7, "o", "m", 0, 1, 0]]), "part backup is not a string"),
    (entry(size=3 * CHUNK, hashes=H * 3, parts=[[None, "o", "m", 0, 2, 0], [None, "o", "m", 1, 2, 0]]),
     "do not cover its chunks in order"),
])
def test_malformed_entries_are_refused(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(IntegrityError, match=message) as caught:
        FileMap.from_metadata(table(bad), "backup X")
    assert str(caught.value).startswith("backup X") and "\n" not in str(caught.value)


def test_a_path_listed_twice_or_a_foreign_chunk_size_is_refused() -> None:
    with pytest.raises(IntegrityError, match="listed twice"):
        FileMap.from_metadata(table(entry(), entry()), "backup X")
    with pytest.raises(IntegrityError, match="chunk_size"):
        FileMap.from_metadata(table(entry(), chunk_size=4096), "backup X")
    with pytest.raises(IntegrityError, match="not a plain relative path"):
        FileMap.from_metadata(table(entry(), dirs=["../up"]), "backup X")


def test_parts_merge_only_when_contiguous_in_the_same_member() -> None:
    parts = [Part(None, "o", "m", 0, 1, 0), Part(None, "o", "m", 1, 1, 1), Part("B", "o", "m", 2, 1, 2),
             Part("B", "o", "m", 3, 1, 5)]
    assert merge_parts(parts) == [Part(None, "o", "m", 0, 2, 0), Part("B", "o", "m", 2, 1, 2),
                                  Part("B", "o", "m", 3, 1, 5)]
    assert Part(None, "o", "m", 0, 1, 0).held_by("P") == Part("P", "o", "m", 0, 1, 0)
    assert FileEntry("a", 0, 0, [chunk_hash(b"")]).to_dict()["hashes"] == chunk_hash(b"")


def manifest(spaces: Any) -> Manifest:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    return Manifest("B1", "pg", "postgres", "physical", now, now, [], {}, {}, {"tablespaces": spaces})


def test_tablespaces_are_checked_and_mapped(tmp_path: Any) -> None:
    good = [{"oid": "16384", "name": "fast", "location": "/srv/fast", "version_dir": "PG_15_202209061"}]
    spaces = tablespaces(manifest(good), {"fast": str(tmp_path / "elsewhere")})
    assert spaces[0].location == tmp_path / "elsewhere"
    with pytest.raises(UsageError, match="has no tablespace slow .it has: fast."):
        tablespaces(manifest(good), {"slow": "/x"})
    for bad in ([{**good[0], "location": "relative/dir"}], [{**good[0], "oid": "../1"}],
                [{**good[0], "version_dir": "../../etc"}], "nope", [["16384"]]):
        with pytest.raises(IntegrityError):
            tablespaces(manifest(bad), {})
    data = tmp_path / "data"
    inside = tablespaces(manifest(good), {"fast": str(data / "ts")})
    with pytest.raises(UsageError, match="inside the data directory"):
        check_tablespaces(inside, data, delta=False)


def with_metadata(metadata: dict[str, Any]) -> Manifest:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    return Manifest("B1", "pg", "postgres", "physical", now, now, [], {}, {}, metadata)


def test_read_map_takes_the_map_from_the_manifest_a_kept_copy_or_the_stream(tmp_path: Any) -> None:
    import io

    from drivers.postgres.filemap import encode, read_map
    from drivers.postgres.mapstore import MapStore

    files = FileMap.from_metadata(table(entry()), "backup X")
    assert read_map(with_metadata(table(entry()))).files == files.files  # older backups: in the manifest
    data, facts = encode(files)
    manifest = with_metadata({"file_map_stream": facts})
    assert read_map(manifest, open_stream=lambda: io.BytesIO(data)).files == files.files
    store = MapStore(tmp_path, "pg")
    store.write("B1", data)
    assert read_map(manifest, store.read).files == files.files
    assert (tmp_path / "filemaps" / "pg" / "B1.json").stat().st_mode & 0o777 == 0o600
    store.write("B1", data.replace(b"base/1/1259", b"base/1/9999"))  # tampered: ignored, the stream is read
    assert store.read(manifest) is None
    assert read_map(manifest, store.read, lambda: io.BytesIO(data)).files == files.files
    with pytest.raises(IntegrityError, match="B1: its file map is neither kept on this host"):
        read_map(manifest, store.read)
    with pytest.raises(IntegrityError, match="object data-filemap does not match the sha256"):
        read_map(manifest, open_stream=lambda: io.BytesIO(data + b" "))
    with pytest.raises(IntegrityError, match="file_map_stream.size"):
        read_map(with_metadata({"file_map_stream": {**facts, "size": 1 << 40}}), open_stream=lambda: io.BytesIO())
    assert store.prune({"B2"}) == 1 and not (tmp_path / "filemaps" / "pg" / "B1.json").exists()
