"""Pruning a real repository: chosen backup times, exact survivors, floors, crash recovery, the CLI."""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
from pathlib import Path

import pytest

import kvlog_driver
from backupd import backup as backup_module
from backupd import metrics, signing
from backupd.backup import run_backup
from backupd.cli.main import main
from backupd.context import JobContext
from backupd.driver import RestoreRequest, RestoreTarget
from backupd.errors import StorageError
from backupd.locks import job_lock
from backupd.logarchive import LogArchive
from backupd.prune import journal_key, run_prune
from backupd.restore import run_restore
from backupd.settings import load_settings
from backupd.sshsig import SigningKey
from backupd.storage import Storage
from backupd.verify import run_verification
from core_fixtures import Keys, SqliteJob, make_sample_db, sqlite_job_config
from signing_support import add_signing, forge_backup, read, signing_key_file
from support import error_lines, run_backupd, write_config

UTC = dt.timezone.utc


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def context(config: Path, job: str = "shop") -> JobContext:
    return JobContext(load_settings(config), job)


def backup_at(ctx: JobContext, moment: dt.datetime, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real backup whose clock reads ``moment`` (id, manifest times, run record)."""
    monkeypatch.setattr(backup_module, "utcnow", lambda: moment)
    return run_backup(ctx).backup_id


def sqlite_config(tmp_path: Path, keys: Keys, storage_table: dict, retention: dict, **extra) -> Path:
    db = tmp_path / "shop.sqlite3"
    if not db.exists():
        make_sample_db(db, rows=50)
    return sqlite_job_config(tmp_path, keys, storage_table, db, {"retention": retention, **extra})


def storage_table(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict:
    if kind == "filesystem":
        return {"type": "filesystem", "path": str(tmp_path / "repo")}
    return {"type": "s3", "bucket": request.getfixturevalue("s3_bucket"), "prefix": "prod/",
            "endpoint_url": request.getfixturevalue("moto_server")}


def sample(name: str, job: str = "shop") -> float:
    value = metrics.REGISTRY.get_sample_value(name, {"job": job})
    return 0.0 if value is None else value


@pytest.mark.parametrize("kind", ["filesystem", "s3"])
def test_exactly_the_expected_backups_remain(kind: str, tmp_path: Path, keys: Keys, request, monkeypatch) -> None:
    config = sqlite_config(tmp_path, keys, storage_table(kind, tmp_path, request),
                           {"keep_last": 2, "keep_daily": 4, "keep_monthly": 2})
    ctx = context(config)
    made = []
    for moment in ["2026-09-30T02:00:00Z", "2026-10-30T02:00:00Z", "2026-10-31T02:00:00Z",
                   "2026-11-20T02:00:00Z", "2026-11-21T02:00:00Z", "2026-11-22T02:00:00Z",
                   "2026-11-23T02:00:00Z", "2026-11-24T02:00:00Z", "2026-11-24T14:00:00Z"]:
        made.append(backup_at(ctx, at(moment), monkeypatch))
    deleted_before = sample("backupd_retention_deleted_objects_total")

    preview = run_prune(ctx, dry_run=True, now=at("2026-11-25T00:00:00Z"))
    assert ctx.repository.backup_ids() == made  # a dry run touches nothing

    result = run_prune(ctx, now=at("2026-11-25T00:00:00Z"))
    # last 2: both of 11-24; daily 4: 11-24, 11-23, 11-22, 11-21; monthly 2: 11-24 and 10-31.
    expected = ["20261031T020000Z", "20261121T020000Z", "20261122T020000Z", "20261123T020000Z",
                "20261124T020000Z", "20261124T140000Z"]
    assert ctx.repository.backup_ids() == expected
    assert sorted(result.deleted_backups) == sorted(set(made) - set(expected)) == sorted(preview.plan.deleted_backups())
    assert result.deleted_objects == 2 * 3  # manifest + one stream each
    assert sample("backupd_retention_deleted_objects_total") - deleted_before == 6
    assert sample("backupd_repository_backups") == 6
    assert not list(ctx.storage.list("shop/backups/20261120T020000Z/"))
    assert not list(ctx.storage.list(journal_key("shop")))

    again = run_prune(ctx, now=at("2026-11-25T00:00:00Z"))  # applying twice changes nothing
    assert again.deleted_objects == 0 and ctx.repository.backup_ids() == expected
    ctx.close()


HOST = SigningKey.generate("backupd@host")  # writes the job's backups
STRANGER = SigningKey.generate("backupd@stranger")


@pytest.mark.parametrize("kind", ["filesystem", "s3"])
def test_forged_manifests_change_nothing_that_prune_deletes(kind: str, tmp_path: Path, keys: Keys, request,
                                                            monkeypatch) -> None:
    """Forged backups placed to take the slots of real ones (the newest two, a day, a month) are left out
    of the plan and kept: prune deletes exactly what it deletes without them."""
    config = sqlite_config(tmp_path, keys, storage_table(kind, tmp_path, request),
                           {"keep_last": 2, "keep_daily": 4, "keep_monthly": 2})
    unchecked = tmp_path / "unchecked.toml"  # the same job read without trusted keys
    unchecked.write_text(config.read_text().replace(str(tmp_path / "state"), str(tmp_path / "unchecked-state")))
    add_signing(config, [HOST.public.line()], signing_key_file(tmp_path / "host.key", HOST))
    ctx = context(config)
    made = [backup_at(ctx, at(moment), monkeypatch) for moment in [
        "2026-09-30T02:00:00Z", "2026-10-30T02:00:00Z", "2026-10-31T02:00:00Z", "2026-11-20T02:00:00Z",
        "2026-11-21T02:00:00Z", "2026-11-22T02:00:00Z", "2026-11-23T02:00:00Z", "2026-11-24T02:00:00Z",
        "2026-11-24T14:00:00Z"]]
    expected = ["20261031T020000Z", "20261121T020000Z", "20261122T020000Z", "20261123T020000Z",
                "20261124T020000Z", "20261124T140000Z"]  # as in test_exactly_the_expected_backups_remain

    newest, evil = made[-1], (tmp_path / "shop.sqlite3").read_bytes()

    def forge(moment: str) -> tuple[str, bytes]:
        return forge_backup(ctx.storage, "shop", newest, evil, keys.recipient, at(moment) - at(newest))

    forged = [forge("2026-11-24T20:00:00Z")[0], forge("2026-11-24T22:00:00Z")[0]]  # unsigned: the last two
    moved, _ = forge("2026-10-31T23:00:00Z")  # October's monthly slot, with a real backup's signature
    ctx.storage.put(f"shop/backups/{moved}/manifest.json.sig",
                    io.BytesIO(read(ctx.storage, f"shop/backups/{newest}/manifest.json.sig")))
    stranger, manifest = forge("2026-11-23T05:00:00Z")  # 11-23's daily slot, signed by an untrusted key
    signing.sign_manifest(ctx.storage, f"shop/backups/{stranger}/manifest.json", manifest, STRANGER)
    forged += [moved, stranger]

    now = at("2026-11-25T00:00:00Z")
    steered = context(unchecked)  # without signatures the forgeries would cost real backups
    assert {"20261031T020000Z", "20261123T020000Z", "20261124T020000Z", "20261124T140000Z"} <= set(
        run_prune(steered, dry_run=True, now=now).plan.deleted_backups())
    steered.close()

    preview = run_prune(ctx, dry_run=True, now=now)
    result = run_prune(ctx, now=now)
    assert sorted(result.deleted_backups) == sorted(preview.plan.deleted_backups()) == sorted(set(made) - set(expected))
    assert ctx.repository.backup_ids() == sorted(expected + forged)  # the forgeries are kept, not planned from
    assert sorted(line.split()[1] for line in result.plan.untrusted) == sorted(forged)
    assert {d.name for d in result.plan.backups} == set(made)  # only real backups are planned
    again = run_prune(ctx, now=now)
    assert again.deleted_objects == 0 and ctx.repository.backup_ids() == sorted(expected + forged)
    ctx.close()


def kvlog_config(tmp_path: Path, keys: Keys, retention: dict) -> Path:
    return write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.kv": {"driver": "kvlog", "path": str(tmp_path / "kv"), "storage": "main", "archive_logs": True,
                    "retention": retention},
    })


def kv_history(ctx: JobContext, store: kvlog_driver.KvStore, monkeypatch, days: int) -> dict[dt.datetime, dict]:
    """A backup at 00:00 each day, a write every 6 hours, a log switch after each write.

    Returns the database's state after each write, by write time.
    """
    archive = ctx.log_archive("oplog")
    states: dict[dt.datetime, dict] = {}
    data: dict[str, str] = {}
    start = at("2026-11-01T00:00:00Z")
    for day in range(days):
        midnight = start + dt.timedelta(days=day)
        store.now = midnight
        backup_at(ctx, midnight, monkeypatch)
        for quarter in range(1, 5):
            moment = midnight + dt.timedelta(hours=6 * quarter) - dt.timedelta(minutes=1)
            store.now = moment
            key, value = f"k{day % 3}", f"day{day}-q{quarter}"
            store.set(key, value)
            data[key] = value
            states[moment] = dict(data)
            name, path = store.rotate()
            archive.push_file(name, path)
    return states


def test_pitr_window_end_to_end(tmp_path: Path, keys: Keys, monkeypatch) -> None:
    kvlog_driver.install(monkeypatch)
    config = kvlog_config(tmp_path, keys, {"keep_last": 2, "pitr_window": "3d"})
    ctx = context(config, "kv")
    store = kvlog_driver.KvStore(tmp_path / "kv")
    states = kv_history(ctx, store, monkeypatch, days=10)
    all_logs = [o.name for o in LogArchive(ctx.storage, "kv", "oplog").list()]
    assert len(all_logs) == 40

    now = at("2026-11-10T12:00:00Z")
    result = run_prune(ctx, now=now)
    # The window starts 11-07 12:00: the 11-07 backup restores it; 11-09 and 11-10 are the last two.
    assert ctx.repository.backup_ids() == ["20261107T000000Z", "20261109T000000Z", "20261110T000000Z"]
    base = ctx.repository.load_manifest("20261107T000000Z")
    first = base.metadata["pitr"]["first_log"]
    remaining = [o.name for o in LogArchive(ctx.storage, "kv", "oplog").list()]
    assert remaining == [n for n in all_logs if n >= first] and remaining[0] == first
    assert len(result.deleted_logs) == len(all_logs) - len(remaining) > 0
    assert sample("backupd_pitr_window_start_timestamp_seconds", "kv") == at("2026-11-07T00:00:00Z").timestamp()

    # The oldest moment of the window still restores, to exactly the state it had.
    window_start = now - dt.timedelta(days=3)
    target = tmp_path / "restored.json"
    request = RestoreRequest(to=str(target), target=RestoreTarget("time", "", window_start))
    run_restore(ctx, request)
    latest_write = max(m for m in states if m <= window_start)
    assert json.loads(target.read_text()) == states[latest_write]
    # And so does the newest state.
    run_restore(ctx, RestoreRequest(to=str(tmp_path / "latest.json")))
    assert json.loads((tmp_path / "latest.json").read_text()) == states[max(states)]
    # Verification (with continuity from every kept backup) passes.
    assert all(r.ok for r in run_verification(ctx))
    ctx.close()


class FailingStorage(Storage):
    """Delegates to a real backend; deleting a chosen key fails once, like a crash mid-prune."""

    def __init__(self, inner: Storage, fail_key: str) -> None:
        self.inner, self.fail_key, self.location = inner, fail_key, inner.location

    def put(self, key, source, *, if_absent=False, metadata=None):
        return self.inner.put(key, source, if_absent=if_absent, metadata=metadata)

    def open(self, key):
        return self.inner.open(key)

    def list(self, prefix):
        return self.inner.list(prefix)

    def stat(self, key):
        return self.inner.stat(key)

    def delete(self, key):
        if key == self.fail_key:
            self.fail_key = ""
            raise StorageError(f"{key}: connection reset")
        self.inner.delete(key)


def test_a_crash_mid_prune_is_finished_by_the_next_prune(tmp_path: Path, keys: Keys, monkeypatch) -> None:
    config = sqlite_config(tmp_path, keys, {"type": "filesystem", "path": str(tmp_path / "repo")},
                           {"keep_last": 1}, timeout="30d")  # old partials would otherwise wait for the timeout
    ctx = context(config)
    old = backup_at(ctx, at("2026-11-24T01:00:00Z"), monkeypatch)
    new = backup_at(ctx, at("2026-11-24T02:00:00Z"), monkeypatch)
    ctx.__dict__["storage"] = FailingStorage(ctx.storage, f"shop/backups/{old}/db.zst.age")
    ctx.__dict__["repository"] = type(ctx.repository)(ctx.storage, "shop")
    with pytest.raises(StorageError):
        run_prune(ctx, now=at("2026-11-24T03:00:00Z"))
    # The manifest went first: the half-deleted backup is no longer listed, its stream remains.
    assert ctx.repository.scan() == ([new], [old])

    assert [d.reasons for d in run_prune(ctx, dry_run=True, now=at("2026-11-24T03:00:00Z")).plan.partials] == []
    result = run_prune(ctx, now=at("2026-11-24T03:00:00Z"))
    assert result.abandoned == [old]  # no run holds the job's lock: what the crashed prune left goes first
    assert ctx.repository.scan() == ([new], [])
    assert not list(ctx.storage.list(journal_key("shop")))
    ctx.close()


def test_partials_go_once_no_run_holds_the_job_lock(tmp_path: Path, keys: Keys, monkeypatch) -> None:
    config = sqlite_config(tmp_path, keys, {"type": "filesystem", "path": str(tmp_path / "repo")},
                           {"keep_last": 1}, timeout="1h")
    ctx = context(config)
    backup_at(ctx, at("2026-11-24T00:00:00Z"), monkeypatch)
    for partial in ("20261124T010000Z", "20261124T023000Z"):  # dead runs, however young
        ctx.storage.put(f"shop/backups/{partial}/db.zst.age", io.BytesIO(b"partial"))
    with job_lock(ctx.state_dir, "shop"):  # a run is writing: a dry run leaves young partials to it
        planned = run_prune(ctx, dry_run=True, now=at("2026-11-24T03:00:00Z"))
    assert planned.abandoned == [] and planned.plan.deleted_partials() == ["20261124T010000Z"]
    assert run_prune(ctx, dry_run=True, now=at("2026-11-24T03:00:00Z")).abandoned == ["20261124T010000Z",
                                                                                      "20261124T023000Z"]
    result = run_prune(ctx, now=at("2026-11-24T03:00:00Z"))
    assert result.abandoned == ["20261124T010000Z", "20261124T023000Z"]
    assert ctx.repository.scan()[1] == []
    ctx.close()


def test_no_pruning_after_a_failed_backup_until_one_succeeds(tmp_path: Path, keys: Keys) -> None:
    config = sqlite_config(tmp_path, keys, {"type": "filesystem", "path": str(tmp_path / "repo")}, {"keep_last": 1})
    db = tmp_path / "shop.sqlite3"
    first = run_backupd("backup", "shop", config=config, check=True).out.strip()
    second = run_backupd("backup", "shop", config=config, check=True).out.strip()
    db.rename(tmp_path / "away.sqlite3")
    assert run_backupd("backup", "shop", config=config).code == 1

    refused = run_backupd("prune", "shop", config=config)
    assert refused.code == 1
    [message, *_] = error_lines(refused.err)
    assert message.startswith("backupd: error: job shop: not pruning: the newest backup run failed at ")
    assert "database file not found" in message
    dry = run_backupd("prune", "shop", "--dry-run", config=config, check=True)
    assert "dry run: pruning is paused" in dry.out and "  delete  " not in dry.out
    ids = [b["backup_id"] for b in json.loads(run_backupd("list", "shop", "--json", config=config).out)["backups"]]
    assert ids == [second, first]

    # A host that never saw the job learns of the failure from the repository.
    elsewhere = {"BACKUPD_DAEMON__STATE_DIR": str(tmp_path / "elsewhere")}
    assert run_backupd("prune", "shop", config=config, env=elsewhere).code == 1

    (tmp_path / "away.sqlite3").rename(db)
    third = run_backupd("backup", "shop", config=config, check=True).out.strip()
    pruned = run_backupd("prune", "shop", config=config, check=True)
    assert "deleted 2 backups" in pruned.out
    ids = [b["backup_id"] for b in json.loads(run_backupd("list", "shop", "--json", config=config).out)["backups"]]
    assert ids == [third]
    assert not (tmp_path / "repo" / "shop" / "state" / "last-failure.json").exists()


def test_empty_policy_deletes_no_backup(sqlite_job: SqliteJob) -> None:
    backup_id = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    result = run_backupd("prune", "shop", config=sqlite_job.config, check=True)
    assert result.out == "job shop: no retention policy; only what dead runs left is removed\n"
    listed = json.loads(run_backupd("list", "--json", config=sqlite_job.config).out)["backups"]
    assert [b["backup_id"] for b in listed] == [backup_id]


def test_dry_run_prints_every_decision_with_reasons(tmp_path: Path, keys: Keys, capsys) -> None:
    config = sqlite_config(tmp_path, keys, {"type": "filesystem", "path": str(tmp_path / "repo")}, {"keep_last": 1})
    ids = [run_backupd("backup", "shop", config=config, check=True).out.strip() for _ in range(2)]
    assert main(["--config", str(config), "--log-level", "error", "prune", "shop", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["KIND", "NAME", "TIME", "ACTION", "REASONS"]
    rows = {line.split()[1]: line for line in out[1:3]}
    assert rows[ids[1]].split()[3:] == ["keep", "newest;", "last", "1", "of", "1"]
    assert rows[ids[0]].split()[3:] == ["delete", "outside", "all", "rules"]
    assert out[-1] == "dry run: would delete 1 backups, 0 partial backups, 0 logs; nothing touched"
    assert main(["--config", str(config), "--log-level", "error", "prune", "shop", "--dry-run", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [d["action"] for d in document["decisions"]] == ["keep", "delete"]
    assert document["decisions"][1]["reasons"] == ["delete: outside all rules"]
    listed = json.loads(run_backupd("list", "shop", "--json", config=config).out)["backups"]
    assert len(listed) == 2


def test_pinned_backups_survive_until_unpinned(tmp_path: Path, keys: Keys) -> None:
    config = sqlite_config(tmp_path, keys, {"type": "filesystem", "path": str(tmp_path / "repo")}, {"keep_last": 1})
    ids = [run_backupd("backup", "shop", config=config, check=True).out.strip() for _ in range(3)]
    pinned = run_backupd("pin", ids[0], "--note", "audit 2026", config=config, check=True)
    assert pinned.out.strip() == f"pinned {ids[0]} of job shop"
    assert (tmp_path / "repo" / "shop" / "pins" / ids[0]).is_file()  # in the repository: survives host loss

    run_backupd("prune", "shop", config=config, check=True)
    remaining = [b["backup_id"] for b in json.loads(run_backupd("list", "--json", config=config).out)["backups"]]
    assert remaining == [ids[2], ids[0]]

    assert run_backupd("unpin", ids[0], config=config, check=True).out.strip() == f"unpinned {ids[0]} of job shop"
    run_backupd("prune", "shop", config=config, check=True)
    remaining = [b["backup_id"] for b in json.loads(run_backupd("list", "--json", config=config).out)["backups"]]
    assert remaining == [ids[2]]


def test_pin_errors(tmp_path: Path, keys: Keys) -> None:
    config = sqlite_config(tmp_path, keys, {"type": "filesystem", "path": str(tmp_path / "repo")}, {"keep_last": 1})
    missing = run_backupd("pin", "20200101T000000Z", config=config)
    assert missing.code == 1 and "backup 20200101T000000Z not found" in error_lines(missing.err)[0]
    bad = run_backupd("pin", "latest", config=config)
    assert bad.code == 2 and "not a backup id" in error_lines(bad.err)[0]
    not_pinned = run_backupd("unpin", "20200101T000000Z", config=config)
    assert not_pinned.code == 1 and "is not pinned" in error_lines(not_pinned.err)[0]
    unknown_job = run_backupd("prune", "nosuch", config=config)
    assert unknown_job.code == 2 and "unknown job 'nosuch'" in error_lines(unknown_job.err)[0]


def test_prune_waits_for_no_running_job(tmp_path: Path, keys: Keys) -> None:
    from backupd.locks import job_lock

    config = sqlite_config(tmp_path, keys, {"type": "filesystem", "path": str(tmp_path / "repo")}, {"keep_last": 1})
    run_backupd("backup", "shop", config=config, check=True)
    with job_lock(tmp_path / "state", "shop"):
        held = run_backupd("prune", "shop", config=config)
    assert held.code == 1 and "job shop is already running" in error_lines(held.err)[0]
    shutil.rmtree(tmp_path / "state" / "locks")
