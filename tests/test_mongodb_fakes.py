"""The MongoDB driver with fake mongodump/mongorestore executables (no MongoDB can be installed here).

Proven here: the exact argv, the password reaching the tools only through a
0600 --config file, stdout streaming into the repository, exit-status and
empty/truncated-output errors, document counts from the archive, the PITR
plan (newest dump before the target, --oplogReplay, slices up to
--oplogLimit), --dry-run, --collection, and oplog slice naming, ordering and
gap detection with BSON built by pymongo's ``bson``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import bson
import pytest
from bson import Timestamp
from bson.raw_bson import RawBSONDocument

import drivers.mongodb.driver as mongo_driver
from backupd import metrics
from backupd.cli.main import main
from backupd.context import JobContext
from backupd.sandbox import host_memory_limit
from backupd.settings import load_settings
from core_fixtures import Keys
from drivers.mongodb.oplog import OplogArchiver, Slice, find_gaps, list_slices, ts_text
from mongo_support import (FakeOplog, FakeServer, build_archive, install_fakes, install_standin_mongod, oplog_entry,
                           tool_calls)
from support import require_tool, write_config

PASSWORD = "m0ngo-pa55-Zq9"
T = 1_800_000_000  # oplog seconds used throughout: 2027-01-15T08:00:00Z


@dataclass
class MongoJob:
    config: Path
    log: Path
    archive: bytes
    repo: Path
    tmp: Path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--log-format", "json", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def job(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> MongoJob:
    bin_dir = tmp_path / "bin"
    install_fakes(bin_dir)
    collections = {"shop.orders": [{"_id": i, "total": i * 3} for i in range(120)],
                   "shop.customers": [{"_id": i} for i in range(7)],
                   "shop.empty": [],
                   "admin.system.version": [{"_id": "featureCompatibilityVersion"}]}
    oplog = [oplog_entry(Timestamp(T, i), n=1000 + i) for i in range(1, 4)]
    archive = build_archive(collections, oplog)
    (tmp_path / "archive.bin").write_bytes(archive)
    log = tmp_path / "tools.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MONGO_LOG", str(log))
    monkeypatch.setenv("FAKE_ARCHIVE", str(tmp_path / "archive.bin"))
    monkeypatch.setattr(mongo_driver, "MongoServer", FakeServer)
    password_file = tmp_path / "mongo.pass"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    config = write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.docs": {"driver": "mongodb", "dsn": "mongodb://backup@db1:27017/?replicaSet=rs0&authSource=admin",
                      "password_file": str(password_file), "storage": "main", "archive_logs": True},
    })
    return MongoJob(config, log, archive, tmp_path / "repo", tmp_path)


def test_backup_argv_config_file_and_counts(job: MongoJob, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--config", str(job.config), "backup", "docs")
    assert code == 0, err
    backup_id = out.strip()
    calls = tool_calls(job.log)
    assert len(calls) == 1
    argv = calls[0]["argv"]
    assert argv[0].endswith("/bin/mongodump")
    assert re.fullmatch(r"--config=.*/spool/docs/\.mongo-tools-[0-9a-f]{12}\.yaml", argv[1])
    assert argv[2:] == ["--archive", "--oplog"]
    assert calls[0]["config_mode"] == "0o600"
    assert calls[0]["config"] == ('uri: "mongodb://backup@db1:27017/?replicaSet=rs0&authSource=admin"\n'
                                  f'password: "{PASSWORD}"\n')
    assert not any(PASSWORD in arg for arg in argv)
    assert not list((job.tmp / "state" / "spool" / "docs").iterdir())  # config and stderr files removed
    assert PASSWORD not in out + err

    code, out, _ = run(capsys, "--config", str(job.config), "show", backup_id, "--json")
    manifest = json.loads(out)
    assert manifest["row_counts"] == {"shop.customers": 7, "shop.empty": 0, "shop.orders": 120}
    assert manifest["objects"][0]["name"] == "archive" and manifest["objects"][0]["raw_size"] == len(job.archive)
    meta = manifest["metadata"]
    assert meta["oplog_from"] == ts_text(Timestamp(T, 3))  # the last oplog entry the dump captured
    assert meta["oplog_entries_in_dump"] == 3 and meta["replica_set"] == "rs0"
    assert meta["pitr"] == {"log_kind": "oplog", "first_log": ts_text(Timestamp(T, 3)),
                            "from": "2027-01-15T08:00:00Z"}
    assert manifest["tool_versions"]["mongodump"] == "100.9.4"
    assert manifest["tool_versions"]["mongodb"] == "7.0.5"


def test_dump_failure_is_redacted_and_leaves_no_backup(job: MongoJob, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MONGODUMP_MODE", "fail")
    code, out, err = run(capsys, "--config", str(job.config), "backup", "docs")
    assert code == 1
    assert ("backupd: error: mongodump exited with status 2: Failed: error connecting to db server: "
            "mongodb://backup:***@db1:27017 refused") in err
    assert "leaked-pw" not in err
    run(capsys, "--config", str(job.config), "list", "--json")
    assert json.loads(run(capsys, "--config", str(job.config), "list", "--json")[1])["backups"] == []


@pytest.mark.parametrize("mode, message", [
    ("empty", "stream 'archive' is empty: the dump produced no data"),
    ("truncated", "mongodump's output is not a complete archive: archive truncated"),
])
def test_empty_or_truncated_output_fails(job: MongoJob, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch, mode: str, message: str) -> None:
    monkeypatch.setenv("FAKE_MONGODUMP_MODE", mode)
    code, _, err = run(capsys, "--config", str(job.config), "backup", "docs")
    assert code == 1 and message in err
    assert json.loads(run(capsys, "--config", str(job.config), "list", "--json")[1])["backups"] == []
    assert not list(job.repo.glob("docs/backups/*/manifest.json"))


def archive_slices(job: MongoJob, entries: list[dict], *, per_slice: int = 2) -> OplogArchiver:
    """Run the archiver over ``entries``, cutting a slice every ``per_slice`` entries (by size)."""
    settings = load_settings(job.config)
    ctx = JobContext(settings, "docs")
    entry_size = len(bson.encode(oplog_entry(Timestamp(T, 1))))
    archiver = OplogArchiver("docs", ctx.log_archive("oplog"), FakeOplog(entries), job.tmp,
                             interval=3600, max_bytes=per_slice * entry_size, start=lambda: Timestamp(T, 3))
    archiver.run(threading.Event())
    return archiver


def test_slices_are_cut_on_the_interval(job: MongoJob) -> None:
    now = [0.0]
    entries = iter([oplog_entry(Timestamp(T, i)) for i in range(3, 9)])

    class Ticking(FakeOplog):
        def tail(self, since, stop):  # type: ignore[no-untyped-def]
            for entry in super().tail(since, stop):
                now[0] += 1.0  # one second per entry (or idle poll)
                yield entry

    ctx = JobContext(load_settings(job.config), "docs")
    archiver = OplogArchiver("docs", ctx.log_archive("oplog"), Ticking(list(entries)), job.tmp,
                             interval=2.5, clock=lambda: now[0], start=lambda: Timestamp(T, 3))
    archiver.run(threading.Event())
    # T:3 is the anchor (t=1); T:4 opens a slice at t=2, which is cut at t=5 (T:7) once 2.5 s passed;
    # T:8 opens the next, cut after three idle polls (t=9)
    assert slice_names(job) == ["1800000000.0000000003-1800000000.0000000007.bson",
                                "1800000000.0000000007-1800000000.0000000008.bson"]


def slice_names(job: MongoJob) -> list[str]:
    ctx = JobContext(load_settings(job.config), "docs")
    return [s.name for s in list_slices(ctx.log_archive("oplog"))]


def test_slices_are_named_ordered_and_resume(job: MongoJob) -> None:
    entries = [oplog_entry(Timestamp(T, i), n=i) for i in range(3, 10)]  # T:3 is the dump's last entry
    archive_slices(job, entries)
    names = slice_names(job)
    assert names == [
        "1800000000.0000000003-1800000000.0000000005.bson",
        "1800000000.0000000005-1800000000.0000000007.bson",
        "1800000000.0000000007-1800000000.0000000009.bson",
    ]
    assert find_gaps([Slice.parse(n) for n in names], Timestamp(T, 3)) == []  # type: ignore[misc]
    # restart: resumes from the last slice's end; T:9 is found again as the anchor, so no gap
    archive_slices(job, entries + [oplog_entry(Timestamp(T + 1, 1), n=99)])
    assert slice_names(job)[-1] == "1800000000.0000000009-1800000001.0000000001.bson"
    ctx = JobContext(load_settings(job.config), "docs")
    with ctx.log_archive("oplog").open(slice_names(job)[0], ctx.identities) as stream:
        stored = list(bson.decode_file_iter(stream))
    assert [e["ts"] for e in stored] == [Timestamp(T, 4), Timestamp(T, 5)]  # (from, to]: T:3 is not repeated


def test_rolled_over_oplog_is_a_counted_gap(job: MongoJob) -> None:
    archive_slices(job, [oplog_entry(Timestamp(T, i)) for i in range(3, 6)])
    before = metrics.ARCHIVE_GAPS.labels("docs")._value.get()
    archiver = archive_slices(job, [oplog_entry(Timestamp(T + 50, i)) for i in range(1, 4)])  # T:5 is gone
    assert archiver.gaps == 1
    assert metrics.ARCHIVE_GAPS.labels("docs")._value.get() == before + 1
    names = slice_names(job)
    assert names[-2] == "1800000050.0000000000-1800000050.0000000002.bson"  # a new chain from T+50:1 on
    gaps = find_gaps([Slice.parse(n) for n in names], Timestamp(T, 3))  # type: ignore[misc]
    assert gaps == ["missing oplog from 1800000000.0000000005 to 1800000050.0000000000 (between slices "
                    f"{names[-3]} and {names[-2]})"]


def test_pitr_restore_plan_and_replay(job: MongoJob, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--config", str(job.config), "backup", "docs")
    assert code == 0, err
    backup_id = out.strip()
    entries = [oplog_entry(Timestamp(T + s, 1), ns="shop.orders" if s % 2 else "shop.customers", n=s)
               for s in range(1, 12)]
    entries.insert(0, oplog_entry(Timestamp(T, 3)))  # the anchor: the dump's last entry
    archive_slices(job, entries, per_slice=3)
    names = slice_names(job)
    to = "mongodb://admin@restore-host:27017/?authSource=admin"
    target = "2027-01-15T08:00:05Z"  # T + 5

    code, out, err = run(capsys, "--config", str(job.config), "restore", "docs", "--to", to,
                         "--target-time", target, "--dry-run")
    assert code == 0, err
    assert backup_id in out and "mongorestore --archive --oplogReplay" in out
    assert f"up to --oplogLimit={T + 6}:0 (2027-01-15T08:00:06Z)" in out
    planned = [line.strip().removeprefix("oplog/") for line in out.splitlines() if "oplog/" in line]
    assert planned == [n for n in names if Slice.parse(n).first.time <= T + 5]  # type: ignore[union-attr]
    assert len(tool_calls(job.log)) == 1  # dry run: only the backup's mongodump ran

    password_file = job.tmp / "target.pass"
    password_file.write_text("target-pw\n")
    code, out, err = run(capsys, "--config", str(job.config), "restore", "docs", "--to", to, "--target-time", target,
                         "--password-file", str(password_file))
    assert code == 0, err
    dump_restore, replay = tool_calls(job.log)[1:]
    assert dump_restore["argv"][1].startswith("--config=")
    assert dump_restore["argv"][2:] == ["--archive", "--oplogReplay", "--stopOnError"]
    assert dump_restore["stdin_bytes"] == len(job.archive)
    assert dump_restore["config"] == f'uri: "{to}"\npassword: "target-pw"\n'
    assert replay["argv"][2:4] == ["--oplogReplay", f"--oplogLimit={T + 6}:0"]
    assert replay["argv"][4] == "--stopOnError" and replay["argv"][5].startswith("--dir=")
    replayed = [e["ts"] for e in bson.decode_all(Path(replay["oplog_copy"]).read_bytes())]
    assert replayed[0] == Timestamp(T + 1, 1)  # the first entry after the dump's consistent point
    assert replayed[-1].time >= T + 5  # the slices reach the target; mongorestore stops at --oplogLimit
    assert Timestamp(T, 3) not in replayed  # the dump already holds it
    assert "target-pw" not in out + err and f"replayed {len(replayed)} oplog entries" in out


def test_collection_restore_filters_the_oplog(job: MongoJob, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--config", str(job.config), "backup", "docs")[0] == 0
    entries = [oplog_entry(Timestamp(T, 3))] + [
        oplog_entry(Timestamp(T + s, 1), ns="shop.orders" if s % 2 else "shop.customers", n=s) for s in range(1, 9)]
    archive_slices(job, entries)
    code, out, err = run(capsys, "--config", str(job.config), "restore", "docs", "--to", "mongodb://h:1",
                         "--collection", "shop.orders")
    assert code == 0, err
    dump_restore, replay = tool_calls(job.log)[1:]
    assert "--nsInclude=shop.orders" in dump_restore["argv"]
    assert "--oplogLimit" not in " ".join(replay["argv"])  # no target: every archived entry
    namespaces = {e["ns"] for e in bson.decode_all(Path(replay["oplog_copy"]).read_bytes())}
    assert namespaces == {"shop.orders"}


def test_restore_refuses_gaps_late_targets_and_passwords(job: MongoJob, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--config", str(job.config), "backup", "docs")[0] == 0
    archive_slices(job, [oplog_entry(Timestamp(T, i)) for i in range(3, 6)])
    archive_slices(job, [oplog_entry(Timestamp(T + 50, i)) for i in range(1, 4)])  # rolled over: gap after T:5

    code, _, err = run(capsys, "--config", str(job.config), "restore", "docs", "--to", "mongodb://h:1",
                       "--target-time", "2027-01-15T08:01:00Z", "--dry-run")
    assert code == 1 and "is past a gap in the archived oplog: missing oplog from 1800000000.0000000005" in err
    assert "reachable from backup" in err and "--to-gap" in err
    code, out, err = run(capsys, "--config", str(job.config), "restore", "docs", "--to", "mongodb://h:1",
                         "--to-gap", "--dry-run")
    assert code == 0, err
    assert "--to-gap: the archived oplog has a gap" in out
    assert f"oplog/{T}." in out and f"oplog/{T + 50}." not in out  # replay stops before the gap

    code, _, err = run(capsys, "--config", str(job.config), "restore", "docs", "--to", "mongodb://h:1",
                       "--target-time", "2027-01-15T09:00:00Z")
    assert code == 1 and "is past a gap in the archived oplog" in err

    code, _, err = run(capsys, "--config", str(job.config), "restore", "docs", "--to", "mongodb://u:pw@h:1")
    assert code == 2 and "--to must not carry a password; use --password-file" in err
    assert len(tool_calls(job.log)) == 1


def test_target_after_newest_slice_is_refused(job: MongoJob, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--config", str(job.config), "backup", "docs")[0] == 0
    archive_slices(job, [oplog_entry(Timestamp(T + s, 1)) for s in range(0, 4)] and
                   [oplog_entry(Timestamp(T, 3))] + [oplog_entry(Timestamp(T + s, 1)) for s in range(1, 4)])
    code, _, err = run(capsys, "--config", str(job.config), "restore", "docs", "--to", "mongodb://h:1",
                       "--target-time", "2027-01-15T10:00:00Z", "--dry-run")
    assert code == 1
    assert "target 2027-01-15T10:00:00Z is after the newest archived oplog entry (2027-01-15T08:00:03Z)" in err


def test_restore_failure_reports_mongorestore_status(job: MongoJob, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(capsys, "--config", str(job.config), "backup", "docs")[0] == 0
    monkeypatch.setenv("FAKE_MONGORESTORE_MODE", "fail")
    code, _, err = run(capsys, "--config", str(job.config), "restore", "docs", "--to", "mongodb://h:1")
    assert code == 1
    assert ("mongorestore (restoring the archive) exited with status 1: Failed: restore error: E11000 duplicate key"
            in err)


def test_standalone_server_dumps_without_oplog(job: MongoJob, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeServer, "replica_set_name", None)
    (job.tmp / "archive.bin").write_bytes(build_archive({"shop.orders": [{"_id": 1}]}, []))
    code, out, err = run(capsys, "--config", str(job.config), "backup", "docs")
    assert code == 0, err
    assert tool_calls(job.log)[0]["argv"][2:] == ["--archive"]
    manifest = json.loads(run(capsys, "--config", str(job.config), "show", out.strip(), "--json")[1])
    assert "pitr" not in manifest["metadata"] and manifest["row_counts"] == {"shop.orders": 1}


def test_check_reports_tools_and_server(job: MongoJob, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--config", str(job.config), "check", "docs")
    lines = out.splitlines()
    assert any(line.startswith("ok") and "jobs.docs: mongodump: 100.9.4" in line for line in lines)
    assert any(line.startswith("ok") and "jobs.docs: replica set: rs0" in line for line in lines)
    assert any("mongod (for verify)" in line for line in lines)


def test_check_reports_the_mongod_verify_will_use(job: MongoJob, capsys: pytest.CaptureFixture[str]) -> None:
    bin_dir = job.tmp / "bin"
    (bin_dir / "mongod").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "mongod").chmod(0o755)
    code, out, _ = run(capsys, "--config", str(job.config), "check", "docs")
    assert any(line.startswith("ok") and f"mongod (for verify): {bin_dir / 'mongod'}" in line
               for line in out.splitlines()), out
    (bin_dir / "mongod").unlink()
    job.config.write_text(job.config.read_text().replace("archive_logs = true",
                                                         'archive_logs = true\nmongod = "no-such-mongod"', 1))
    code, out, _ = run(capsys, "--config", str(job.config), "check", "docs")
    assert any("mongod (for verify): no-such-mongod: not found on PATH" in line for line in out.splitlines()), out


@pytest.fixture
def standin(job: MongoJob, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The job verifies with the stand-in mongod, through the real pymongo client, in the sandbox."""
    require_tool("bwrap")
    directory = Path(tempfile.mkdtemp(prefix="mongod-standin-"))  # readable by the scratch user, unlike tmp_path
    mongod = install_standin_mongod(directory, [str(keys.identity_file), str(job.config), str(job.tmp)])
    text = job.config.read_text()
    job.config.write_text(text.replace("archive_logs = true", f'archive_logs = true\nmongod = "{mongod}"', 1))
    yield mongod
    shutil.rmtree(directory, ignore_errors=True)


def test_verify_runs_the_scratch_mongod_sandboxed(job: MongoJob, standin: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from backupd import children
    from backupd.restore import RepositorySource
    from drivers.mongodb.server import MongoServer

    assert run(capsys, "--config", str(job.config), "backup", "docs")[0] == 0
    monkeypatch.setattr(mongo_driver, "MongoServer", MongoServer)
    ctx = JobContext(load_settings(job.config), "docs")
    source = RepositorySource(ctx.repository, ctx.repository.resolve(None), ctx.identities, str(ctx.identity_file))
    scratch = Path(tempfile.mkdtemp(prefix="backupd-verify-test-"))
    try:
        outcome = ctx.driver.verify(source, scratch, [])
        seen = json.loads((scratch / "mongod" / "standin.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert outcome.steps == [{"step": "mongorestore", "bytes": len(job.archive)}]
    assert outcome.row_counts == {}  # the stand-in stores nothing
    assert seen["visible"] == {str(ctx.identity_file): False, str(job.config): False, str(job.tmp): False}
    assert not seen["root"]
    if os.geteuid() == 0:
        assert seen["uid"] != 0
    assert seen["args"]["--wiredTigerCacheSizeGB"] == "0.25"  # not WiredTiger's default (half the RAM less 1 GB)
    assert seen["oom_score_adj"] == "1000" and seen["rlimit_data"] == [host_memory_limit()] * 2
    restore = tool_calls(job.log)[-1]
    assert restore["tool"] == "mongorestore" and re.search(r'uri: "mongodb://%2F.*mongodb-\d+\.sock', restore["config"])
    assert not children.live()


def test_archive_the_scratch_restore_refuses_fails_verification(job: MongoJob, standin: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from drivers.mongodb.server import MongoServer

    assert run(capsys, "--config", str(job.config), "backup", "docs")[0] == 0
    monkeypatch.setattr(mongo_driver, "MongoServer", MongoServer)
    monkeypatch.setenv("FAKE_MONGORESTORE_MODE", "fail")
    code, out, err = run(capsys, "--config", str(job.config), "verify", "docs")
    assert code == 3, out + err
    assert ("the scratch restore refused the archive: mongorestore (restoring the archive) exited with status 1: "
            "Failed: restore error: E11000 duplicate key") in out
    assert list(job.repo.glob("docs/verify/*.json"))


def test_partial_replay_keeps_only_the_namespaces_operations() -> None:
    from drivers.mongodb.plan import narrowed

    def entry(doc: dict) -> RawBSONDocument:
        return RawBSONDocument(bson.encode({"ts": Timestamp(T, 1), **doc}))

    wanted = ["shop.orders"]
    assert narrowed(entry({"op": "i", "ns": "shop.orders", "o": {"_id": 1}}), wanted) is not None
    assert narrowed(entry({"op": "i", "ns": "shop.customers", "o": {"_id": 1}}), wanted) is None
    assert narrowed(entry({"op": "c", "ns": "shop.$cmd", "o": {"create": "orders"}}), wanted) is not None
    assert narrowed(entry({"op": "c", "ns": "shop.$cmd", "o": {"drop": "customers"}}), wanted) is None
    assert narrowed(entry({"op": "i", "ns": "crm.people", "o": {"_id": 1}}), ["crm.*"]) is not None
    txn = entry({"op": "c", "ns": "admin.$cmd", "o": {"applyOps": [
        {"op": "i", "ns": "shop.orders", "o": {"_id": 1}}, {"op": "i", "ns": "shop.customers", "o": {"_id": 2}}]}})
    kept = bson.decode(narrowed(txn, wanted))  # type: ignore[arg-type]
    assert [op["ns"] for op in kept["o"]["applyOps"]] == ["shop.orders"] and kept["ts"] == Timestamp(T, 1)
    assert narrowed(txn, ["crm.*"]) is None
    assert narrowed(txn, []) == txn.raw
