"""WAL in one folder per 256 segments (DESIGN.md "Repository format"): a repository written in the
layout before the folders is read, migrated (`backupd migrate`), and read again; listings and
retention work across a folder boundary."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
from pathlib import Path
from typing import Iterator

import pytest

from backupd import age, migrate, retention, signing, sshsig
from backupd.context import JobContext
from backupd.driver import RestoreRequest
from backupd.logarchive import LogArchive
from backupd.manifest import Manifest
from backupd.pipeline import encode_bytes
from backupd.repository import Layout, Repository
from backupd.restore import run_restore
from backupd.settings import RetentionSettings, load_settings
from backupd.verify import run_verification
from backupd.storage import ObjectInfo
from core_fixtures import Keys, keys  # noqa: F401
from storage.filesystem import FilesystemStorage
from support import run_backupd, write_config
from test_signed_logs import HOST_A, key_file

JOB = "pg"
# the last two segments of logical log 0 and the first two of log 1: two folders
SEGMENTS = ["0000000100000000000000FE", "0000000100000000000000FF", "000000010000000100000000",
            "000000010000000100000001"]


def name_of(segment: str) -> str:
    return f"{segment[:8]}/{segment}"


def put_old_layout(storage: FilesystemStorage, keys: Keys, name: str, data: bytes) -> str:
    """A log object as versions before the folders wrote it: flat key, v1 signature over that key."""
    key = f"{JOB}/wal/{name}.zst.age"
    sha256 = hashlib.sha256(data).hexdigest()
    storage.put(key + ".sig", io.BytesIO(sshsig.sign(signing.legacy_log_message(key, sha256), HOST_A).encode()))
    body = encode_bytes(data, [age.parse_recipient(keys.recipient)], 3)
    storage.put(key, io.BytesIO(body), metadata={"sha256": sha256, "raw-size": str(len(data))})
    return key


@pytest.fixture
def old_repo(tmp_path: Path, keys: Keys) -> tuple[FilesystemStorage, dict[str, bytes], Path]:  # noqa: F811
    storage = FilesystemStorage(tmp_path / "repo")
    contents = {name_of(seg): os.urandom(4096) for seg in SEGMENTS}
    contents["00000002/00000002.history"] = b"1\t0/1000000\tno recovery target specified\n"
    for name, data in contents.items():
        put_old_layout(storage, keys, name, data)
    data_dir = tmp_path / "pgdata"
    (data_dir / "pg_wal").mkdir(parents=True)
    config = write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "signing": {"trusted_keys": [HOST_A.public.line()]},
        f"jobs.{JOB}": {"driver": "postgres", "dsn": "postgresql://postgres@127.0.0.1:1/x", "storage": "main",
                        "method": "physical", "archive_logs": True, "data_dir": str(data_dir)},
    })
    return storage, contents, config


def read_all(storage: FilesystemStorage, keys: Keys, contents: dict[str, bytes], config: Path,  # noqa: F811
             tmp_path: Path) -> None:
    archive = LogArchive(storage, JOB, "wal", trusted=[HOST_A.public])
    assert [o.name for o in archive.list()] == sorted(contents)
    for name, data in contents.items():
        with archive.open(name, [keys.identity]) as stream:
            assert stream.read() == data
    for segment in SEGMENTS[1:3]:  # wal-fetch, as PostgreSQL's restore_command, across the folder boundary
        dest = tmp_path / f"fetched-{segment}"
        fetched = run_backupd("wal-fetch", "--job", JOB, segment, str(dest), config=config)
        assert fetched.code == 0, fetched.err
        assert dest.read_bytes() == contents[name_of(segment)]


def log_keys(storage: FilesystemStorage) -> list[str]:
    return sorted(info.key for info in storage.list(f"{JOB}/wal/"))


def test_old_layout_is_read_migrated_and_read_again(old_repo, keys: Keys, tmp_path: Path) -> None:  # noqa: F811
    storage, contents, config = old_repo
    read_all(storage, keys, contents, config, tmp_path)
    before = log_keys(storage)

    dry = run_backupd("migrate", JOB, "--dry-run", config=config, check=True)
    assert "would move 4 log objects" in dry.out and log_keys(storage) == before

    moved = run_backupd("migrate", JOB, config=config, check=True)
    assert "moved 4 log objects" in moved.out, moved.out
    migrated = log_keys(storage)
    assert migrated == sorted([
        f"{JOB}/wal/00000001/0000000100000000/0000000100000000000000FE.zst.age",
        f"{JOB}/wal/00000001/0000000100000000/0000000100000000000000FE.zst.age.sig",
        f"{JOB}/wal/00000001/0000000100000000/0000000100000000000000FF.zst.age",
        f"{JOB}/wal/00000001/0000000100000000/0000000100000000000000FF.zst.age.sig",
        f"{JOB}/wal/00000001/0000000100000001/000000010000000100000000.zst.age",
        f"{JOB}/wal/00000001/0000000100000001/000000010000000100000000.zst.age.sig",
        f"{JOB}/wal/00000001/0000000100000001/000000010000000100000001.zst.age",
        f"{JOB}/wal/00000001/0000000100000001/000000010000000100000001.zst.age.sig",
        f"{JOB}/wal/00000002/00000002.history.zst.age",
        f"{JOB}/wal/00000002/00000002.history.zst.age.sig",
    ])
    storage.stat(Layout(JOB).log_layout_key("wal"))
    # the moved objects keep their (v1) signatures: still trusted
    read_all(storage, keys, contents, config, tmp_path)

    again = run_backupd("migrate", JOB, config=config, check=True)
    assert "moved 0 log objects" in again.out and log_keys(storage) == migrated


def test_an_interrupted_migration_finishes_and_a_conflict_is_kept(old_repo, keys: Keys,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    storage, contents, config = old_repo
    layout = Layout(JOB)
    first, second = name_of(SEGMENTS[0]), name_of(SEGMENTS[1])
    # cut short after the copy: both layouts hold the same object
    old = layout.legacy_log_key("wal", first)
    assert old is not None
    storage.put(layout.log_key("wal", first), storage.open(old), metadata=storage.stat(old).metadata)
    # another object under the name where it goes now: never overwritten, never lost
    put_other = LogArchive(storage, JOB, "wal", [age.parse_recipient(keys.recipient)])
    other = tmp_path / "other"
    other.write_bytes(b"other" * 100)
    storage.put(layout.log_key("wal", second), io.BytesIO(encode_bytes(other.read_bytes(), put_other.recipients, 3)),
                metadata={"sha256": hashlib.sha256(other.read_bytes()).hexdigest(), "raw-size": "500"})

    done = run_backupd("migrate", JOB, config=config)
    assert done.code == 1 and "left in the old one" in done.out, done.out
    assert f"{layout.log_key('wal', second)} holds other content" in done.out
    keys_now = log_keys(storage)
    assert old not in keys_now and layout.legacy_log_key("wal", second) in keys_now
    with pytest.raises(Exception):
        storage.stat(layout.log_layout_key("wal"))  # not done while a log is left behind
    # the first is read from its new place, with its signature
    with LogArchive(storage, JOB, "wal", trusted=[HOST_A.public]).open(first, [keys.identity]) as stream:
        assert stream.read() == contents[first]


class CountingStorage(FilesystemStorage):
    """The filesystem backend, counting listings by prefix."""

    listed: list[str]

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self.listed.append(prefix)
        return super().list(prefix)


def test_a_folder_is_listed_alone_and_retention_deletes_across_folders(tmp_path: Path,
                                                                       keys: Keys) -> None:  # noqa: F811
    storage = CountingStorage(tmp_path / "repo")
    storage.listed = []
    archive = LogArchive(storage, JOB, "wal", [age.parse_recipient(keys.recipient)], level=1)
    source = tmp_path / "seg"
    for segment in SEGMENTS:
        source.write_bytes(segment.encode() * 100)
        archive.push_file(name_of(segment), source)
    source.write_bytes(b"1\t0/1000000\tno recovery target specified\n")
    archive.push_file("00000002/00000002.history", source)
    # an object left in the layout before the folders is found by a folder's listing too
    put_old_layout(storage, keys, "00000001/000000010000000100000002", b"old")

    storage.listed.clear()
    folder = [o.name for o in archive.list("00000001/0000000100000001")]
    assert folder == [name_of(s) for s in SEGMENTS[2:]] + ["00000001/000000010000000100000002"]
    assert storage.listed == [f"{JOB}/wal/00000001/0000000100000001"]

    now = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    backup = retention.BackupItem("20261130T000000Z", now - dt.timedelta(days=1),
                                  retention.PitrPoint("wal", name_of(SEGMENTS[2]), now - dt.timedelta(days=1)))
    logs = [retention.LogItem("wal", o.name, o.modified) for o in archive.list()]
    plan = retention.plan([backup], logs, RetentionSettings(keep_last=1), now)
    deleted = [d.name for d in plan.deleted_logs()]
    assert deleted == [name_of(s) for s in SEGMENTS[:2]]
    assert "keep: timeline history" in next(d for d in plan.logs if d.name.endswith(".history")).reasons
    for name in deleted:
        archive.delete(name)
    assert [o.name for o in archive.list()] == sorted(
        ["00000002/00000002.history", *(name_of(s) for s in SEGMENTS[2:]), "00000001/000000010000000100000002"])
    assert not list(storage.list(f"{JOB}/wal/00000001/0000000100000000/"))


def physical_manifest(backup_id: str, start_lsn: str, first: str) -> Manifest:
    moment = dt.datetime(2026, 11, 30, tzinfo=dt.timezone.utc)
    return Manifest(backup_id, JOB, "postgres", "physical", moment, moment, [], {}, {}, metadata={
        "timeline": 1, "start_lsn": start_lsn, "stop_lsn": start_lsn, "wal_segment_size": 16 << 20,
        "wal_range": {"first": first}, "pitr": {"log_kind": "wal", "first_log": first, "from": "2026-11-30T00:00:00Z"},
    }, tool_versions={"postgresql": "150000"})


def test_a_restore_plan_lists_only_the_folders_its_range_needs(old_repo, keys: Keys,  # noqa: F811
                                                              tmp_path: Path) -> None:
    storage, _, config = old_repo  # logical logs 0 and 1 in the layout before folders, a timeline 2 history
    signer = key_file(tmp_path / "signing.key", HOST_A)
    archive = LogArchive(storage, JOB, "wal", [age.parse_recipient(keys.recipient)], level=1,
                         signing_key_file=signer)
    source = tmp_path / "seg"
    source.write_bytes(b"x" * 100)
    for segno in range(0x102, 0x212):  # from logical log 1 across into log 2
        archive.push_file(name_of(f"00000001{segno >> 8:08X}{segno & 0xFF:08X}"), source)
    for segno in range(0x400, 0x402):  # logical log 4, after a whole folder missing: past the plan's walk
        archive.push_file(name_of(f"00000001{segno >> 8:08X}{segno & 0xFF:08X}"), source)
    old = Repository(storage, JOB, signing_key_file=signer)
    old.commit(physical_manifest("20261130T000000Z", "1/80000028", "00000001/000000010000000100000080"))
    newer = physical_manifest("20261201T000000Z", "2/05000028", "00000001/000000010000000200000005")
    old.commit(newer)

    ctx = JobContext(load_settings(config), JOB)
    counting = CountingStorage(storage.root)
    counting.listed = []
    ctx.__dict__["storage"] = counting
    lines = run_restore(ctx, RestoreRequest(to=str(tmp_path / "restored"), dry_run=True), newer.backup_id)
    assert any("WAL: from 00000001/000000010000000200000005 to 000000010000000200000011" in line for line in lines), \
        lines
    wal_listings = [prefix for prefix in counting.listed if "/wal/" in prefix]
    # the folders from the backup's first segment to the first empty one, each once, and timeline 2 (its
    # history is archived) where its parent ended; never the whole archive, never logical logs 0, 1 or 4
    assert wal_listings == [f"{JOB}/wal/00000001/0000000100000002", f"{JOB}/wal/00000001/0000000100000003",
                            f"{JOB}/wal/00000002/0000000200000002"]

    # integrity checks of every backup: their continuity from one listing of the archive
    counting.listed.clear()
    reports = run_verification(ctx, integrity_only=True)
    assert len(reports) == 2
    assert [prefix for prefix in counting.listed if "/wal/" in prefix] == [f"{JOB}/wal/"]
    ctx.close()


def test_the_daemon_migrates_once_in_the_background(old_repo) -> None:  # noqa: F811
    storage, contents, _ = old_repo
    assert migrate.kinds_of("postgres") == ["wal"] and migrate.kinds_of("sqlite") == []
    migrate.migrate_in_background([(JOB, FilesystemStorage(storage.root), ["wal"])]).join(60)
    storage.stat(Layout(JOB).log_layout_key("wal"))
    assert [o.name for o in LogArchive(storage, JOB, "wal").list()] == sorted(contents)
    assert not any(Layout(JOB).legacy_log_key("wal", name) == key
                   for name in contents for key in log_keys(storage))
    # the next start sees the marker: not even a listing
    counting = CountingStorage(storage.root)
    counting.listed = []
    assert migrate.migrate(counting, JOB, ["wal"], if_needed=True).moved == []
    assert counting.listed == []
