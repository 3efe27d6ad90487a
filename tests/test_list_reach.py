"""``list``'s PITR column at the cost of what was archived since the last full check (issue 22): the index
records each log kind's checkpoint and every backup's reach; ``list`` lists only the logs from the checkpoint
on and the driver carries the reaches over them. Gaps recorded or new show as before; requests do not grow
with the archive behind the checkpoint."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import pytest

from backupd import context
from backupd.cli.main import main
from backupd.context import JobContext
from backupd.logarchive import LogArchive
from backupd.manifest import Manifest
from backupd.settings import load_settings
from backupd.storage import Storage
from backupd.timeutil import format_timestamp
from core_fixtures import Repo, sqlite_job_config
from scale_support import scale, scale_storage
from storage.filesystem import FilesystemStorage
from support import write_config


SEGMENT_SIZE = 16 << 20


def segment(number: int, timeline: int = 1) -> str:
    return f"{timeline:08X}{number >> 8:08X}{number & 0xFF:08X}"


def wal_key(number: int, timeline: int = 1) -> str:
    name = segment(number, timeline)
    return f"shop/wal/{timeline:08X}/{name[:16]}/{name}.zst.age"


def pg_manifest(number: int, start_segment: int) -> bytes:
    """A physical PostgreSQL backup whose WAL begins at ``start_segment`` (only its listing is ever read)."""
    document = json.loads(scale.manifest(number))
    document.update(driver="postgres", method="physical")
    document["metadata"] = {"timeline": 1, "start_lsn": f"0/{start_segment * SEGMENT_SIZE + 0x28:X}",
                            "wal_segment_size": SEGMENT_SIZE,
                            "pitr": {"log_kind": "wal", "first_log": f"00000001/{segment(start_segment)}",
                                     "from": document["started_at"]}}
    return json.dumps(document, indent=2).encode() + b"\n"


def put(storage: Storage, key: str, data: bytes = b"w" * 64) -> None:
    storage.put(key, io.BytesIO(data))


def pg_job(repository: Repo, tmp_path: Path, keys, starts: list[int], segments: list[int]) -> Path:  # type: ignore[no-untyped-def]
    for number, start in enumerate(starts):
        prefix = f"shop/backups/{scale.backup_id(number)}/"
        put(repository.storage, prefix + "db.zst.age", scale.STREAM)
        put(repository.storage, prefix + "manifest.json", pg_manifest(number, start))
    for number in segments:
        put(repository.storage, wal_key(number))
    return write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": repository.table,
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.shop": {"driver": "postgres", "dsn": "postgresql://backup@localhost/shop", "method": "physical",
                      "storage": "main", "archive_logs": True},
    })


def listed(config: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    capsys.readouterr()
    assert main(["--config", str(config), "--log-level", "error", "list", "shop", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def windows(document: dict) -> dict[str, tuple[str, str | None]]:
    return {b["backup_id"]: (b["pitr"]["to"], b["pitr"]["broken_at"]) for b in document["backups"]}


def summary_of(config: Path) -> dict:
    """{kind: {"checkpoint", "taken_at", "reaches": {backup id: the recorded reach}}} as the index holds it."""
    ctx = JobContext(load_settings(config), "shop")
    try:
        return {kind: {"checkpoint": s.checkpoint, "taken_at": s.taken_at, "reaches": s.reaches}
                for kind, s in ctx.repository.index(fresh=True).log_summary.items()}
    finally:
        ctx.close()


def arrival(storage: Storage, number: int) -> str:
    modified = storage.stat(wal_key(number)).modified
    assert modified is not None
    return format_timestamp(modified)


def test_a_segment_archived_after_the_checkpoint_extends_the_window(repository: Repo, tmp_path: Path, keys,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = pg_job(repository, tmp_path, keys, [3, 10], list(range(3, 21)))
    first = listed(config, capsys)  # no summary yet: the whole archive, recorded
    assert first["log_summaries"] == []
    assert windows(first) == {scale.backup_id(0): (arrival(repository.storage, 20), None),
                              scale.backup_id(1): (arrival(repository.storage, 20), None)}
    recorded = summary_of(config)["wal"]
    assert recorded["checkpoint"] == f"00000001/{segment(20)}"
    assert set(recorded["reaches"]) == {scale.backup_id(0), scale.backup_id(1)}
    assert listed(config, capsys)["backups"] == first["backups"]  # nothing new: the same output
    put(repository.storage, wal_key(21))
    later = listed(config, capsys)
    assert windows(later) == {scale.backup_id(0): (arrival(repository.storage, 21), None),
                              scale.backup_id(1): (arrival(repository.storage, 21), None)}
    assert [s["checkpoint"] for s in later["log_summaries"]] == [f"00000001/{segment(20)}"]
    assert later["log_summaries"][0]["taken_at"] == format_timestamp(recorded["taken_at"])


def test_a_gap_in_the_tail_is_shown(repository: Repo, tmp_path: Path, keys, capsys: pytest.CaptureFixture[str]) -> None:
    config = pg_job(repository, tmp_path, keys, [3], list(range(3, 21)))
    listed(config, capsys)
    put(repository.storage, wal_key(21))
    put(repository.storage, wal_key(23))  # 22 never arrived
    document = listed(config, capsys)
    assert windows(document) == {scale.backup_id(0): (arrival(repository.storage, 21), segment(22))}
    assert document["log_summaries"]  # from the summary, not a whole listing
    capsys.readouterr()
    assert main(["--config", str(config), "--log-level", "error", "list", "shop"]) == 0
    assert f"(gap: {segment(22)} missing)" in capsys.readouterr().out


def test_a_gap_recorded_by_the_last_full_check_is_shown(repository: Repo, tmp_path: Path, keys,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = pg_job(repository, tmp_path, keys, [3, 16], [n for n in range(3, 21) if n != 12])
    first = listed(config, capsys)
    assert windows(first)[scale.backup_id(0)] == (arrival(repository.storage, 11), segment(12))
    assert summary_of(config)["wal"]["reaches"][scale.backup_id(0)].first_missing == segment(12)
    put(repository.storage, wal_key(21))
    later = listed(config, capsys)
    assert windows(later) == {scale.backup_id(0): (arrival(repository.storage, 11), segment(12)),
                              scale.backup_id(1): (arrival(repository.storage, 21), None)}


def test_a_backup_committed_after_the_summary_gets_its_reach_from_its_own_logs(
        repository: Repo, tmp_path: Path, keys, capsys: pytest.CaptureFixture[str]) -> None:
    config = pg_job(repository, tmp_path, keys, [3], list(range(3, 21)))
    listed(config, capsys)
    prefix = f"shop/backups/{scale.backup_id(1)}/"
    put(repository.storage, prefix + "db.zst.age", scale.STREAM)
    put(repository.storage, prefix + "manifest.json", pg_manifest(1, 22))
    for number in (22, 23, 25):
        put(repository.storage, wal_key(number))
    document = listed(config, capsys)
    assert windows(document) == {scale.backup_id(0): (arrival(repository.storage, 20), segment(21)),
                                 scale.backup_id(1): (arrival(repository.storage, 23), segment(24))}


def test_a_new_timeline_in_the_tail_lists_the_whole_archive_again(repository: Repo, tmp_path: Path, keys,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = pg_job(repository, tmp_path, keys, [3], list(range(3, 21)))
    listed(config, capsys)
    put(repository.storage, "shop/wal/00000002/00000002.history.zst.age", b"1\t0/15000000\tno recovery target\n")
    put(repository.storage, f"shop/wal/00000002/{segment(21, 2)[:16]}/{segment(21, 2)}.zst.age")
    document = listed(config, capsys)
    assert document["log_summaries"] == []  # the driver could not decide from the tail: a whole listing
    assert summary_of(config)["wal"]["checkpoint"] == f"00000001/{segment(20)}"  # left to the next full check


def test_without_a_summary_list_shows_what_a_whole_listing_finds(repository: Repo, tmp_path: Path, keys,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = pg_job(repository, tmp_path, keys, [3, 10], [n for n in range(3, 25) if n != 15])
    ctx = JobContext(load_settings(config), "shop")
    try:
        manifests = [m for m, _ in ctx.repository.entries()]
        expected = ctx.log_reaches(manifests)  # what list showed before the summary existed
    finally:
        ctx.close()
    document = listed(config, capsys)
    assert windows(document) == {
        backup_id: (format_timestamp(reach.until) if reach and reach.until else "", reach.first_missing if reach else None)
        for backup_id, reach in expected.items()}


# ---- cost -------------------------------------------------------------------------------------------------

def counted_list(monkeypatch: pytest.MonkeyPatch, config: Path) -> int:
    counts: dict[str, int] = {}
    opened = context.open_storage
    monkeypatch.setattr(context, "open_storage", lambda s, n: scale.count_requests(opened(s, n), counts))
    assert main(["--config", str(config), "--log-level", "error", "list", "shop"]) == 0
    monkeypatch.setattr(context, "open_storage", opened)
    return scale.requests(counts)


@pytest.mark.parametrize("kind", ["filesystem", "s3"])
def test_list_costs_the_same_requests_however_many_logs_lie_behind_the_checkpoint(
        kind: str, tmp_path: Path, keys, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str]) -> None:
    costs: dict[int, int] = {}
    for wal in (30, 3000):
        work = tmp_path / str(wal)
        work.mkdir()
        table = scale_storage(kind, work, request, f"reach-{wal}", 6, wal, pitr=True, flat=True)
        config = sqlite_job_config(work, keys, table, work / "db.sqlite3")
        assert main(["--config", str(config), "--log-level", "error", "list", "shop"]) == 0  # records the summary
        assert summary_of(config)["wal"]["checkpoint"] == scale.wal_name(wal - 1)
        costs[wal] = counted_list(monkeypatch, config)
        document = listed(config, capsys)
        assert document["log_summaries"] and all(b["pitr"]["broken_at"] is None for b in document["backups"])
    assert costs[30] == costs[3000], costs


def test_prune_takes_the_recorded_reaches_of_what_it_deletes(tmp_path: Path, keys,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    scale.build_fs(tmp_path / "repo", 8, 400, pitr=True, flat=True)
    config = sqlite_job_config(tmp_path, keys, {"type": "filesystem", "path": str(tmp_path / "repo")},
                               tmp_path / "db.sqlite3", {"retention": {"keep_last": 2}})
    listed(config, capsys)
    assert len(summary_of(config)["wal"]["reaches"]) == 8
    assert main(["--config", str(config), "--log-level", "error", "prune", "shop"]) == 0
    recorded = summary_of(config)["wal"]
    assert set(recorded["reaches"]) == {scale.backup_id(6), scale.backup_id(7)}
    assert [b["backup_id"] for b in listed(config, capsys)["backups"]] == [scale.backup_id(7), scale.backup_id(6)]


def test_a_full_integrity_check_records_the_summary_list_extends(tmp_path: Path, keys,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    scale.build_fs(tmp_path / "repo", 4, 40, pitr=True, flat=True)
    config = sqlite_job_config(tmp_path, keys, {"type": "filesystem", "path": str(tmp_path / "repo")},
                               tmp_path / "db.sqlite3")
    JobContext(load_settings(config), "shop").repository.backup_ids()  # the index, without a summary
    assert summary_of(config) == {}
    assert main(["--config", str(config), "--log-level", "error", "verify", "shop", "--integrity-only"]) == 0
    recorded = summary_of(config)["wal"]
    assert recorded["checkpoint"] == scale.wal_name(39) and len(recorded["reaches"]) == 4
    assert main(["--config", str(config), "--log-level", "error", "verify", "shop", "--integrity-only",
                 "--backup", scale.backup_id(1)]) == 0
    assert summary_of(config)["wal"] == recorded  # one backup's check is not a full one: left as it was
    assert listed(config, capsys)["log_summaries"][0]["taken_at"] == format_timestamp(recorded["taken_at"])


def test_prune_dry_run_lists_the_logs_it_can_delete_and_those_since_the_checkpoint_only(
        tmp_path: Path, keys, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Backup N's logs begin at segment 50 N; keep_last 2 keeps backups 6 and 7, so segments 0-299 could go: the
    dry run lists up to the folder holding segment 300, and, for the PITR breaks, from the checkpoint's folder."""
    scale.build_fs(tmp_path / "repo", 8, 3000, flat=True)
    for number in range(8):
        path = tmp_path / "repo" / "shop" / "backups" / scale.backup_id(number) / "manifest.json"
        document = json.loads(path.read_text())
        document["metadata"]["pitr"] = {"log_kind": "wal", "first_log": scale.wal_name(number * 50),
                                        "from": document["started_at"]}
        path.write_text(json.dumps(document, indent=2) + "\n")
    config = sqlite_job_config(tmp_path, keys, {"type": "filesystem", "path": str(tmp_path / "repo")},
                               tmp_path / "db.sqlite3", {"retention": {"keep_last": 2}})
    listed(config, capsys)  # records the summary: checkpoint segment 2999
    keys_read: list[str] = []
    opened = context.open_storage

    def counting(settings: object, name: str) -> Storage:
        storage = opened(settings, name)  # type: ignore[arg-type]
        for method in ("list", "list_after"):
            plain = getattr(storage, method)

            def listing(*args, plain=plain):  # type: ignore[no-untyped-def]
                for info in plain(*args):
                    keys_read.append(info.key)
                    yield info
            setattr(storage, method, listing)
        return storage

    monkeypatch.setattr(context, "open_storage", counting)
    assert main(["--config", str(config), "--log-level", "error", "prune", "shop", "--dry-run"]) == 0
    monkeypatch.setattr(context, "open_storage", opened)
    wal = [key for key in keys_read if key.startswith("shop/wal/")]
    assert wal and all(key <= f"shop/wal/{scale.wal_name(512)}.zst.age" or key >= "shop/wal/000000010000000B"
                       for key in wal), sorted(set(wal))[:3]
    assert len(wal) < 513 + 256


def test_the_daemons_integrity_rotation_records_the_summary(tmp_path: Path, keys) -> None:
    from backupd.daemon.runs import Runs, Slots
    from backupd.daemon.state import ScheduleState
    from backupd.daemon.tasks import Tasks

    scale.build_fs(tmp_path / "repo", 3, 40, pitr=True, flat=True)
    config = sqlite_job_config(tmp_path, keys, {"type": "filesystem", "path": str(tmp_path / "repo")},
                               tmp_path / "db.sqlite3")
    settings = load_settings(config)
    Tasks(lambda: settings, Runs(), Slots(1), ScheduleState(tmp_path / "state")).integrity("shop")
    recorded = summary_of(config)["wal"]
    assert recorded["checkpoint"] == scale.wal_name(39) and len(recorded["reaches"]) == 3


# ---- drivers: a reach carried over the tail is the reach a whole listing finds ---------------------------

def a_manifest(driver: str, metadata: dict) -> Manifest:
    moment = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    return Manifest("20260101T000000Z", "shop", driver, "logical", moment, moment, [], {}, {}, metadata)


def binlog(number: int, partial: bool = False) -> str:
    return f"1/mysql-bin.{number:06d}" + (".partial" if partial else "")


def oplog(first: int, last: int) -> str:
    return f"{first:010d}.0000000001-{last:010d}.0000000001.bson"


@pytest.mark.parametrize("before, since", [
    ([3, 4, 5], [6, 7]),  # archived in order
    ([3, 4, 5], [7, 8]),  # 6 never arrived
    ([3, 4, 5], []),  # nothing new
    ([3, 4], [(5, True)]),  # the newest still being written
    ([3, 4, (5, True)], [5, 6]),  # the one being written completed, and the next followed
])
def test_mysql_extends_a_reach_as_a_whole_listing_would(tmp_path: Path, before: list, since: list) -> None:
    from drivers.mysql import pitr

    storage = FilesystemStorage(tmp_path / "repo")
    archive = LogArchive(storage, "shop", "binlog")
    manifest = a_manifest("mysql", {"server": "1", "binlog": {"file": "mysql-bin.000003", "position": 4}})

    def archived(items: list) -> None:
        for item in items:
            number, partial = item if isinstance(item, tuple) else (item, False)
            put(storage, f"shop/binlog/{binlog(number, partial)}.zst.age")

    archived(before)
    recorded = pitr.reach(archive, manifest)
    assert recorded is not None and not recorded.broken
    checkpoint = archive.list()[-1].name
    archived(since)
    assert pitr.extend(manifest, recorded, checkpoint, archive.list_from(checkpoint)) == pitr.reach(archive, manifest)


@pytest.mark.parametrize("since", [[(300, 400)], [(300, 400), (500, 600)], []])
def test_mongodb_extends_a_reach_as_a_whole_listing_would(tmp_path: Path, since: list) -> None:
    from drivers.mongodb import plan
    from drivers.mongodb.oplog import list_slices

    storage = FilesystemStorage(tmp_path / "repo")
    archive = LogArchive(storage, "shop", "oplog")
    manifest = a_manifest("mongodb", {"oplog_from": "0000000150.0000000000"})
    for first, last in [(100, 200), (200, 300), *since]:
        put(storage, f"shop/oplog/{oplog(first, last)}.zst.age")
        if (first, last) == (200, 300):
            recorded = plan.reach(manifest, list_slices(archive))
            checkpoint = archive.list()[-1].name
    assert recorded is not None and not recorded.broken
    assert plan.extend(recorded, checkpoint, archive.list_from(checkpoint)) == plan.reach(manifest, list_slices(archive))


def test_an_integrity_check_of_one_backup_lists_only_the_logs_from_its_first(tmp_path: Path, keys,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    costs: dict[int, int] = {}
    for wal in (60, 4800):
        work = tmp_path / str(wal)
        work.mkdir()
        scale.build_fs(work / "repo", 6, wal, pitr=True)
        config = sqlite_job_config(work, keys, {"type": "filesystem", "path": str(work / "repo")}, work / "db.sqlite3")
        counts: dict[str, int] = {}
        opened = context.open_storage
        monkeypatch.setattr(context, "open_storage", lambda s, n: scale.count_requests(opened(s, n), counts))
        assert main(["--config", str(config), "--log-level", "error", "verify", "shop", "--integrity-only",
                     "--backup", scale.backup_id(5)]) == 0
        monkeypatch.setattr(context, "open_storage", opened)
        costs[wal] = scale.requests(counts)
    assert costs[60] == costs[4800], costs  # the 4,000 logs before the backup's first one are never listed
