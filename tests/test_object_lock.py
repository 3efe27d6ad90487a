"""S3 Object Lock: uploads carry a retention the policy guarantees; prune reports locked objects and carries on.

moto (on 127.0.0.1) enforces Object Lock on deleting a version, which is what
these tests lean on; it ignores the lock headers of a multipart upload, so that
request is checked as sent. A storage that refuses deletes without saying so on
``stat`` (a test double) covers an object locked after planning.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydantic import ValidationError

import s3_server
from backupd.errors import ObjectLocked
from backupd.prune import run_prune
from backupd.retention import guaranteed_keep
from backupd.settings import RetentionSettings
from backupd.storage import LOCKED_INDEFINITELY, ObjectInfo, Storage
from storage.s3 import MiB, S3Options, S3Storage
from test_prune import at, backup_at, context, kv_history, sqlite_config
from core_fixtures import Keys
from support import run_backupd, write_config
import kvlog_driver

UTC = dt.timezone.utc
DAY = dt.timedelta(days=1)


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


@pytest.fixture
def lock_bucket(moto_server: str) -> str:
    """A fresh bucket with Object Lock (and so versioning) enabled."""
    name = f"lock-{uuid.uuid4().hex[:20]}"
    s3_server.client(moto_server).create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


@pytest.fixture
def locking_storage(moto_server: str, lock_bucket: str) -> Iterator[S3Storage]:
    options = S3Options(bucket=lock_bucket, prefix="p/", endpoint_url=moto_server, region="us-east-1",
                        part_size=5 * MiB, max_attempts=2, object_lock="compliance")
    with S3Storage(options) as storage:
        yield storage


def head(endpoint: str, bucket: str, key: str) -> dict[str, Any]:
    return s3_server.client(endpoint).head_object(Bucket=bucket, Key=key)


def versions(endpoint: str, bucket: str, prefix: str) -> list[str]:
    resp = s3_server.client(endpoint).list_object_versions(Bucket=bucket, Prefix=prefix)
    return [v["Key"] for v in [*resp.get("Versions", []), *resp.get("DeleteMarkers", [])]]


def lock(endpoint: str, bucket: str, key: str, until: dt.datetime) -> None:
    s3_server.client(endpoint).put_object_retention(
        Bucket=bucket, Key=key, Retention={"Mode": "GOVERNANCE", "RetainUntilDate": until})


def kv_config(tmp_path: Path, keys: Keys, endpoint: str, bucket: str, retention: dict) -> Path:
    """A log-archiving job on an Object Lock bucket."""
    return write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "s3", "bucket": bucket, "prefix": "prod/", "endpoint_url": endpoint,
                         "object_lock": "compliance"},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.kv": {"driver": "kvlog", "path": str(tmp_path / "kv"), "storage": "main", "archive_logs": True,
                    "retention": retention},
    })


# ---- the guarantee --------------------------------------------------------------------

@pytest.mark.parametrize(("policy", "backup", "log"), [
    ({"keep_within": "3d"}, 3 * DAY, dt.timedelta(0)),
    ({"pitr_window": "7d"}, dt.timedelta(0), 7 * DAY),
    ({"keep_within": "2d", "pitr_window": "7d", "keep_last": 3}, 2 * DAY, 7 * DAY),
    ({"keep_last": 30}, dt.timedelta(0), dt.timedelta(0)),  # counts: the next backups may displace it
    ({"keep_daily": 7, "keep_weekly": 4, "keep_monthly": 12, "keep_yearly": 5, "keep_hourly": 24},
     dt.timedelta(0), dt.timedelta(0)),  # calendar: a later backup the same day replaces it
    ({}, dt.timedelta(0), dt.timedelta(0)),
])
def test_the_guarantee_of_each_policy(policy: dict, backup: dt.timedelta, log: dt.timedelta) -> None:
    settings = RetentionSettings.model_validate(policy)
    assert guaranteed_keep(settings) == guaranteed_keep(settings, "backup") == backup
    assert guaranteed_keep(settings, "log") == log


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        guaranteed_keep(RetentionSettings(keep_within="1d"), "manifest")  # type: ignore[arg-type]


# ---- options --------------------------------------------------------------------------

def test_object_lock_options() -> None:
    assert S3Options(bucket="b-1").object_lock is None
    assert S3Options(bucket="b-1", object_lock="GOVERNANCE").object_lock == "governance"
    assert S3Options(bucket="b-1", object_lock="compliance", object_lock_min_days=30).object_lock_min_days == 30
    for bad, words in [({"object_lock": "legal-hold"}, "governance"),
                       ({"object_lock": "compliance", "object_lock_min_days": -1}, "greater than or equal to 0"),
                       ({"object_lock_min_days": 7}, "object_lock_min_days needs object_lock")]:
        with pytest.raises(ValidationError, match=words):
            S3Options(bucket="b-1", **bad)


def test_a_bad_option_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.offsite": {"type": "s3", "bucket": "db-backups", "object_lock_min_days": 30},
        "encryption": {"recipients": ["age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj"]},
    })
    result = run_backupd("check", config=config)
    assert result.code == 2
    assert 'storage.offsite: object_lock_min_days needs object_lock = "governance" or "compliance"' in result.err


# ---- uploads ---------------------------------------------------------------------------

def test_backups_and_logs_carry_the_guaranteed_retention(tmp_path: Path, keys: Keys, moto_server: str,
                                                         lock_bucket: str, monkeypatch) -> None:
    kvlog_driver.install(monkeypatch)
    config = kv_config(tmp_path, keys, moto_server, lock_bucket, {"keep_within": "3d", "pitr_window": "7d"})
    ctx = context(config, "kv")
    store = kvlog_driver.KvStore(tmp_path / "kv")
    before = now()
    backup_id = backup_at(ctx, at("2026-11-01T00:00:00Z"), monkeypatch)
    store.set("k", "v")
    name, path = store.rotate()
    ctx.log_archive("oplog").push_file(name, path)
    partial = tmp_path / "partial"
    partial.write_bytes(b"still growing")
    ctx.log_archive("oplog").push_file("partial.partial", partial, replace=True)

    objects = [i.key for i in ctx.storage.list(f"kv/backups/{backup_id}/")]
    assert len(objects) == 2 and any(k.endswith("manifest.json") for k in objects)
    for key in objects:
        meta = head(moto_server, lock_bucket, f"prod/{key}")
        assert meta["ObjectLockMode"] == "COMPLIANCE"
        assert meta["ObjectLockRetainUntilDate"] >= before + 3 * DAY
        assert meta["ObjectLockRetainUntilDate"] <= now() + 3 * DAY + dt.timedelta(seconds=2)
        assert ctx.storage.stat(key).locked_until == meta["ObjectLockRetainUntilDate"]
    log_meta = head(moto_server, lock_bucket, f"prod/kv/oplog/{name}.zst.age")
    assert log_meta["ObjectLockMode"] == "COMPLIANCE"
    assert log_meta["ObjectLockRetainUntilDate"] >= before + 7 * DAY
    # A partial log is replaced and then deleted as it grows: never locked.
    assert "ObjectLockMode" not in head(moto_server, lock_bucket, "prod/kv/oplog/partial.partial.zst.age")
    ctx.log_archive("oplog").delete("partial.partial")
    assert not versions(moto_server, lock_bucket, "prod/kv/oplog/partial.partial")
    # Control objects (here the prune journal's kind: a plain put) are not locked either.
    ctx.storage.put("kv/state/x.json", io.BytesIO(b"{}"))
    assert "ObjectLockMode" not in head(moto_server, lock_bucket, "prod/kv/state/x.json")
    ctx.close()


def test_min_days_is_a_floor(moto_server: str, lock_bucket: str) -> None:
    options = S3Options(bucket=lock_bucket, endpoint_url=moto_server, object_lock="governance",
                        object_lock_min_days=30)
    with S3Storage(options) as storage:
        before = now()
        storage.put("a", io.BytesIO(b"a"), retain_until=before + DAY)
        storage.put("b", io.BytesIO(b"b"), retain_until=before + 90 * DAY)
    a, b = head(moto_server, lock_bucket, "a"), head(moto_server, lock_bucket, "b")
    assert a["ObjectLockMode"] == b["ObjectLockMode"] == "GOVERNANCE"
    assert before + 30 * DAY <= a["ObjectLockRetainUntilDate"] <= now() + 30 * DAY + dt.timedelta(seconds=2)
    assert before + 90 * DAY <= b["ObjectLockRetainUntilDate"] <= before + 90 * DAY + dt.timedelta(seconds=2)


def test_no_guarantee_and_no_floor_puts_unlocked(moto_server: str, lock_bucket: str) -> None:
    options = S3Options(bucket=lock_bucket, endpoint_url=moto_server, object_lock="compliance")
    with S3Storage(options) as storage:
        storage.put("a", io.BytesIO(b"a"), retain_until=now())  # e.g. keep_last only
        storage.delete("a")
    assert not versions(moto_server, lock_bucket, "a")


def test_a_multipart_upload_asks_for_the_lock(locking_storage: S3Storage) -> None:
    sent: list[dict[str, Any]] = []
    locking_storage._client.meta.events.register(
        "provide-client-params.s3.CreateMultipartUpload", lambda params, **_: sent.append(dict(params)))
    until = now() + 2 * DAY
    locking_storage.put("big", io.BytesIO(b"x" * (6 * MiB)), retain_until=until)
    [params] = sent
    assert params["ObjectLockMode"] == "COMPLIANCE"
    assert until <= params["ObjectLockRetainUntilDate"] <= until + dt.timedelta(seconds=1)
    assert locking_storage.stat("big").size == 6 * MiB


def test_storage_without_object_lock_sends_no_lock_headers(s3_storage: S3Storage, moto_server: str,
                                                           s3_bucket: str) -> None:
    s3_storage.put("a", io.BytesIO(b"a"), retain_until=now() + DAY)
    assert "ObjectLockMode" not in head(moto_server, s3_bucket, "test/a")
    assert s3_storage.stat("a").locked_until is None


# ---- deleting ---------------------------------------------------------------------------

def test_delete_removes_every_version(locking_storage: S3Storage, moto_server: str, lock_bucket: str) -> None:
    locking_storage.put("k", io.BytesIO(b"one"))
    locking_storage.put("k", io.BytesIO(b"two"))  # a second version: must not resurface
    locking_storage.put("k2", io.BytesIO(b"neighbour"))  # a key that merely starts with "k"
    locking_storage.delete("k")
    assert versions(moto_server, lock_bucket, "p/k") == ["p/k2"]
    locking_storage.delete("k")  # missing: not an error
    locking_storage.delete("never-written")


def test_deleting_a_locked_object_raises_object_locked(locking_storage: S3Storage, moto_server: str,
                                                       lock_bucket: str) -> None:
    until = now() + 2 * DAY
    locking_storage.put("k", io.BytesIO(b"one"))
    locking_storage.put("k", io.BytesIO(b"locked"), retain_until=until)
    with pytest.raises(ObjectLocked, match=r"s3://lock-[0-9a-f]+/p/k: locked until 20\d\d-.*Z \(Object Lock\)") as exc:
        locking_storage.delete("k")
    assert exc.value.until is not None and until <= exc.value.until <= until + dt.timedelta(seconds=1)
    assert exc.value.exit_code == 1
    with locking_storage.open("k") as handle:  # the current version is untouched
        assert handle.read() == b"locked"


def test_a_legal_hold_is_locked_indefinitely(locking_storage: S3Storage, moto_server: str,
                                             lock_bucket: str) -> None:
    locking_storage.put("held", io.BytesIO(b"x"))
    s3_server.client(moto_server).put_object_legal_hold(Bucket=lock_bucket, Key="p/held",
                                                        LegalHold={"Status": "ON"})
    assert locking_storage.stat("held").locked_until == LOCKED_INDEFINITELY
    with pytest.raises(ObjectLocked, match="under legal hold") as exc:
        locking_storage.delete("held")
    assert exc.value.until == LOCKED_INDEFINITELY


def test_a_bucket_locked_by_its_owner_is_detected(moto_server: str, lock_bucket: str) -> None:
    """object_lock unset here, but the bucket has Object Lock: deletes still remove versions."""
    with S3Storage(S3Options(bucket=lock_bucket, endpoint_url=moto_server)) as storage:
        storage.put("k", io.BytesIO(b"x"))
        lock(moto_server, lock_bucket, "k", now() + DAY)
        storage.put("free", io.BytesIO(b"x"))
        storage.delete("free")
        with pytest.raises(ObjectLocked):
            storage.delete("k")
    assert versions(moto_server, lock_bucket, "") == ["k"]


# ---- prune ------------------------------------------------------------------------------

def test_prune_keeps_a_locked_backup_and_prunes_the_rest(tmp_path: Path, keys: Keys, moto_server: str,
                                                         lock_bucket: str, monkeypatch) -> None:
    table = {"type": "s3", "bucket": lock_bucket, "prefix": "prod/", "endpoint_url": moto_server,
             "object_lock": "governance"}
    config = sqlite_config(tmp_path, keys, table, {"keep_last": 1})  # no guarantee: uploads unlocked
    ctx = context(config)
    old, middle, new = (backup_at(ctx, at(t), monkeypatch) for t in
                        ("2026-11-20T02:00:00Z", "2026-11-21T02:00:00Z", "2026-11-22T02:00:00Z"))
    until = (now() + DAY).replace(microsecond=0)
    lock(moto_server, lock_bucket, f"prod/shop/backups/{old}/db.zst.age", until)  # a stream, not the manifest

    preview = run_prune(ctx, dry_run=True)
    assert preview.plan.deleted_backups() == [middle]

    result = run_prune(ctx)
    [kept] = [d for d in result.plan.backups if d.name == old]
    assert kept.keep and kept.reasons[0] == f"keep: locked until {until:%Y-%m-%dT%H:%M:%SZ} (Object Lock)"
    assert result.deleted_backups == [middle]
    # The locked backup is still listed, whole, and readable; the other is gone with every version.
    assert ctx.repository.backup_ids() == [old, new]
    assert not ctx.repository.check_integrity(ctx.repository.load_manifest(old))
    assert not versions(moto_server, lock_bucket, f"prod/shop/backups/{middle}/")
    assert not versions(moto_server, lock_bucket, "prod/shop/state/prune.json")

    cli = run_backupd("prune", "shop", config=config)
    assert cli.code == 0, cli.err
    assert "locked until" in cli.out and "deleted 0 backups" in cli.out
    ctx.close()


def test_prune_reports_locked_logs_and_exits_0(tmp_path: Path, keys: Keys, moto_server: str,
                                               lock_bucket: str, monkeypatch) -> None:
    """Logs pushed under a 3-day window are locked for 3 days (real time); unlocked backups still go."""
    kvlog_driver.install(monkeypatch)
    config = kv_config(tmp_path, keys, moto_server, lock_bucket, {"keep_last": 2, "pitr_window": "3d"})
    ctx = context(config, "kv")
    kv_history(ctx, kvlog_driver.KvStore(tmp_path / "kv"), monkeypatch, days=5)

    result = run_prune(ctx, now=at("2026-11-05T12:00:00Z"))
    # The window starts 11-02 12:00: 11-02 is its base; 11-04 and 11-05 are the last two.
    assert ctx.repository.backup_ids() == ["20261102T000000Z", "20261104T000000Z", "20261105T000000Z"]
    assert sorted(result.deleted_backups) == ["20261101T000000Z", "20261103T000000Z"]
    assert not result.deleted_logs
    assert len(result.locked) == 4 == len(result.locked_until)  # the logs before the base's first
    assert all(key.startswith("kv/oplog/") for key in result.locked)
    locked = [d for d in result.plan.logs if d.reasons[0].startswith("keep: locked until")]
    assert len(locked) == 4 and all(d.keep for d in locked)
    report = result.to_dict()
    assert report["locked"] == result.locked and all(report["locked_until"].values())
    json.dumps(report)
    ctx.close()


class LockedDeletes(Storage):
    """A real backend whose deletes of chosen keys are refused, while ``stat`` does not say so
    (an S3-compatible store that hides retention on HEAD, or a lock set after planning)."""

    def __init__(self, inner: Storage, locked: set[str]) -> None:
        self.inner, self.locked, self.location = inner, locked, inner.location

    def put(self, key, source, *, if_absent=False, metadata=None, retain_until=None):
        return self.inner.put(key, source, if_absent=if_absent, metadata=metadata, retain_until=retain_until)

    def open(self, key):
        return self.inner.open(key)

    def list(self, prefix):
        return self.inner.list(prefix)

    def stat(self, key) -> ObjectInfo:
        return self.inner.stat(key)

    def delete(self, key):
        if key in self.locked:
            raise ObjectLocked(f"{key}: locked until 2026-12-01T00:00:00Z", until=at("2026-12-01T00:00:00Z"))
        self.inner.delete(key)


def test_a_manifest_locked_after_planning_keeps_the_backup(tmp_path: Path, keys: Keys, monkeypatch) -> None:
    config = sqlite_config(tmp_path, keys, {"type": "filesystem", "path": str(tmp_path / "repo")}, {"keep_last": 1})
    ctx = context(config)
    ids = [backup_at(ctx, at(f"2026-11-2{day}T02:00:00Z"), monkeypatch) for day in range(3)]
    refused = {f"shop/backups/{ids[0]}/manifest.json"}
    ctx.__dict__["storage"] = LockedDeletes(ctx.storage, refused)
    ctx.__dict__["repository"] = type(ctx.repository)(ctx.storage, "shop")

    result = run_prune(ctx, now=at("2026-11-23T00:00:00Z"))
    assert result.deleted_backups == [ids[1]]
    assert result.locked == sorted(refused)
    assert result.locked_until == {key: "2026-12-01T00:00:00Z" for key in refused}
    decision = result.plan.backups[-1]
    assert decision.name == ids[0] and decision.keep
    assert decision.reasons[0] == "keep: locked until 2026-12-01T00:00:00Z (Object Lock)"
    assert ctx.repository.backup_ids() == [ids[0], ids[2]]  # still listed, objects intact
    assert not ctx.repository.check_integrity(ctx.repository.load_manifest(ids[0]))
    ctx.close()


def test_a_partial_with_locked_objects_is_kept_and_reported(tmp_path: Path, keys: Keys, monkeypatch) -> None:
    config = sqlite_config(tmp_path, keys, {"type": "filesystem", "path": str(tmp_path / "repo")}, {"keep_last": 1},
                           timeout="1h")
    ctx = context(config)
    backup_at(ctx, at("2026-11-24T00:00:00Z"), monkeypatch)
    for stream in ("a", "b"):
        ctx.storage.put(f"shop/backups/20261123T000000Z/{stream}.zst.age", io.BytesIO(b"partial"))
    ctx.__dict__["storage"] = LockedDeletes(ctx.storage, {"shop/backups/20261123T000000Z/a.zst.age"})
    ctx.__dict__["repository"] = type(ctx.repository)(ctx.storage, "shop")

    result = run_prune(ctx, now=at("2026-11-24T03:00:00Z"))
    assert result.deleted_partials == [] and result.deleted_objects == 1
    assert result.locked == ["shop/backups/20261123T000000Z/a.zst.age"]
    assert result.plan.partials[0].keep
    ctx.close()
