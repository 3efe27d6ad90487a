"""Backup types in the core (DESIGN.md "Backup types"): --type, parents and chains, restore and verify of a
chain, a broken chain refused naming the backup it lacks, retention of chains, list columns, schedules, metrics.

The driver is a test double with honest incrementals (``kvlog_driver.KvincrDriver``); the MariaDB and
PostgreSQL engines are tested against real servers in their own files.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

import kvlog_driver
from backupd import backup as backup_module
from backupd import metrics
from backupd.backup import run_backup
from backupd.cli.main import main
from backupd.context import JobContext
from backupd.daemon.scheduler import desired_jobs
from backupd.driver import RestoreRequest
from backupd.errors import BrokenChain, ConfigError, IntegrityError, UsageError
from backupd.prune import run_prune
from backupd.restore import run_restore
from backupd.settings import load_settings
from backupd.verify import run_verification
from core_fixtures import Keys
from support import write_config

UTC = dt.timezone.utc


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def kv_config(tmp_path: Path, keys: Keys, **job: object) -> Path:
    return write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.kv": {"driver": "kvincr", "path": str(tmp_path / "kv"), "storage": "main", **job},
    })


@pytest.fixture
def kv(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> tuple[JobContext, kvlog_driver.KvStore]:
    kvlog_driver.install(monkeypatch)
    config = kv_config(tmp_path, keys, retention={"keep_last": 1})
    store = kvlog_driver.KvStore(tmp_path / "kv")
    for index in range(100):
        store.set(f"k{index:03d}", f"value {index}")
    return JobContext(load_settings(config), "kv"), store


def take(ctx: JobContext, backup_type: str | None, moment: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(backup_module, "utcnow", lambda: at(moment))
    return run_backup(ctx, backup_type=backup_type).backup_id


def restored(ctx: JobContext, tmp_path: Path, backup_id: str) -> dict:
    out = tmp_path / f"restored-{backup_id}.json"
    run_restore(ctx, RestoreRequest(to=str(out)), backup_id)
    return json.loads(out.read_text())


def test_diff_and_incr_store_what_changed_and_restore_their_chain(kv, tmp_path: Path, monkeypatch) -> None:
    ctx, store = kv
    full = take(ctx, None, "2026-11-01T00:00:00Z", monkeypatch)
    store.set("k001", "changed once")
    incr1 = take(ctx, "incr", "2026-11-01T01:00:00Z", monkeypatch)
    store.set("k002", "changed twice")
    diff = take(ctx, "diff", "2026-11-01T02:00:00Z", monkeypatch)
    store.set("k003", "changed thrice")
    incr2 = take(ctx, "incr", "2026-11-01T03:00:00Z", monkeypatch)

    repo = ctx.repository
    manifests = {m.backup_id: m for m in repo.manifests()}
    assert [(manifests[i].backup_type, manifests[i].parent) for i in (full, incr1, diff, incr2)] == [
        ("full", None), ("incr", full), ("diff", full), ("incr", diff)]
    assert manifests[full].metadata["type"] == "full" and manifests[full].metadata["parent"] is None
    assert manifests[incr2].raw_size < manifests[full].raw_size / 10  # (age headers outweigh 100 keys stored)
    assert [m.backup_id for m in repo.chain(manifests[incr2])] == [full, diff, incr2]
    assert [m.backup_id for m in repo.chain(manifests[incr1])] == [full, incr1]

    expected = {f"k{index:03d}": f"value {index}" for index in range(100)}
    assert restored(ctx, tmp_path, full) == expected
    assert restored(ctx, tmp_path, incr1) == {**expected, "k001": "changed once"}
    assert restored(ctx, tmp_path, incr2) == {**expected, "k001": "changed once", "k002": "changed twice",
                                              "k003": "changed thrice"}
    [report] = run_verification(ctx, incr2)
    assert report.ok, report.problems
    assert report.steps[0]["chain"] == [full, diff, incr2]


def test_without_a_full_a_diff_takes_a_full(kv, monkeypatch) -> None:
    import structlog

    ctx, _ = kv
    with structlog.testing.capture_logs() as logged:  # whatever an earlier test configured structlog to print
        backup_id = take(ctx, "diff", "2026-11-01T00:00:00Z", monkeypatch)
    manifest = ctx.repository.load_manifest(backup_id)
    assert (manifest.backup_type, manifest.parent) == ("full", None)
    assert "no full physical backup of job kv in the repository: taking a full backup instead of a diff" in \
        [entry["event"] for entry in logged]


def test_a_missing_parent_refuses_backup_restore_and_verify_naming_it(kv, tmp_path: Path, monkeypatch) -> None:
    ctx, store = kv
    take(ctx, None, "2026-11-01T00:00:00Z", monkeypatch)
    store.set("k001", "x")
    incr1 = take(ctx, "incr", "2026-11-01T01:00:00Z", monkeypatch)
    store.set("k002", "y")
    incr2 = take(ctx, "incr", "2026-11-01T02:00:00Z", monkeypatch)
    (tmp_path / "repo" / "kv" / "backups" / incr1 / "manifest.json").unlink()  # pruned by hand

    with pytest.raises(BrokenChain, match=f"backup {incr2} needs its parent backup {incr1}, which is missing"):
        take(ctx, "incr", "2026-11-01T03:00:00Z", monkeypatch)
    assert ctx.repository.backup_ids()[-1] == incr2  # nothing was written
    with pytest.raises(BrokenChain, match=f"parent backup {incr1}, which is missing from the repository"):
        restored(ctx, tmp_path, incr2)
    assert not (tmp_path / f"restored-{incr2}.json").exists()
    [report] = run_verification(ctx, incr2, integrity_only=True)
    assert not report.ok and incr1 in report.problems[0]


def test_integrity_reads_every_stream_of_the_chain(kv, tmp_path: Path, monkeypatch) -> None:
    ctx, store = kv
    full = take(ctx, None, "2026-11-01T00:00:00Z", monkeypatch)
    store.set("k001", "x")
    incr = take(ctx, "incr", "2026-11-01T01:00:00Z", monkeypatch)
    damaged = tmp_path / "repo" / "kv" / "backups" / full / "data.zst.age"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\0")
    [report] = run_verification(ctx, incr, integrity_only=True)
    assert not report.ok
    assert report.problems == [f"kv/backups/{full}/data.zst.age: sha256 differs from the manifest's (object corrupt)"]


def test_types_need_the_capability_and_method(tmp_path: Path, keys: Keys, monkeypatch) -> None:
    kvlog_driver.install(monkeypatch)
    config = write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.plain": {"driver": "kvlog", "path": str(tmp_path / "kv"), "storage": "main"},
    })
    ctx = JobContext(load_settings(config), "plain")
    with pytest.raises(UsageError, match="job plain cannot take an incr backup: --type diff|incr needs method"):
        run_backup(ctx, backup_type="incr")
    assert main(["--config", str(config), "--log-level", "error", "backup", "plain", "--type", "diff"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "backup", "plain", "--type", "weekly"])
    assert exit_info.value.code == 2


def test_typed_schedules_are_validated_and_scheduled(tmp_path: Path, keys: Keys, monkeypatch) -> None:
    kvlog_driver.install(monkeypatch)
    config = kv_config(tmp_path, keys, schedule="0 2 * * 0", diff_schedule="0 2 * * 1-6", incr_schedule="@every 1h",
                       retention={"keep_last": 3})
    specs = {spec.job_id: spec.schedule for spec in desired_jobs(load_settings(config))}
    assert specs["backup:kv"] == "0 2 * * 0"
    assert specs["backup-diff:kv"] == "0 2 * * 1-6"
    assert specs["backup-incr:kv"] == "@every 1h"
    with pytest.raises(ConfigError) as bad:
        load_settings(kv_config(tmp_path, keys, incr_schedule="every hour"))
    assert any(line.startswith("jobs.kv.incr_schedule: ") for line in bad.value.errors)
    plain = write_config(tmp_path / "plain.toml", {
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "jobs.plain": {"driver": "kvlog", "path": str(tmp_path / "kv"), "storage": "main",
                       "diff_schedule": "@every 1h"},
    })
    with pytest.raises(ConfigError) as bad:
        load_settings(plain)
    assert bad.value.errors == ["jobs.plain.diff_schedule: diff and incr backups need method physical on a driver "
                                "that takes them (driver kvlog, method logical) (got '@every 1h')"]


def test_retention_keeps_the_chain_of_a_kept_backup(kv, tmp_path: Path, monkeypatch, capsys) -> None:
    ctx, store = kv  # keep_last = 1
    old_full = take(ctx, None, "2026-11-01T00:00:00Z", monkeypatch)
    old_incr = take(ctx, "incr", "2026-11-01T01:00:00Z", monkeypatch)
    full = take(ctx, None, "2026-11-02T00:00:00Z", monkeypatch)
    store.set("k001", "x")
    incr1 = take(ctx, "incr", "2026-11-02T01:00:00Z", monkeypatch)
    store.set("k002", "y")
    incr2 = take(ctx, "incr", "2026-11-02T02:00:00Z", monkeypatch)
    assert main(["--config", str(ctx.settings.source), "--log-level", "error", "prune", "kv", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"parent of {incr2}" in out and f"parent of {incr1}" in out
    assert f"expired with its full {old_full}" in out
    result = run_prune(ctx, now=at("2026-11-03T00:00:00Z"))
    assert result.deleted_backups == [old_incr, old_full]  # the child before its parent
    assert ctx.repository.backup_ids() == [full, incr1, incr2]
    assert restored(ctx, tmp_path, incr2)["k002"] == "y"


def test_list_shows_type_and_parent(kv, monkeypatch, capsys) -> None:
    ctx, store = kv
    full = take(ctx, None, "2026-11-01T00:00:00Z", monkeypatch)
    incr = take(ctx, "incr", "2026-11-01T01:00:00Z", monkeypatch)
    config = str(ctx.settings.source)
    assert main(["--config", config, "--log-level", "error", "list", "kv", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["backups"]
    assert [(b["backup_id"], b["type"], b["parent"]) for b in listed] == [(incr, "incr", full), (full, "full", None)]
    assert main(["--config", config, "--log-level", "error", "list", "kv"]) == 0
    header, first, second = capsys.readouterr().out.splitlines()[:3]
    assert header.split()[:5] == ["ID", "JOB", "METHOD", "TYPE", "PARENT"]
    assert first.split()[:5] == [incr, "kv", "physical", "incr", full]
    assert second.split()[:5] == [full, "kv", "physical", "full", "-"]


def test_failures_count_with_the_requested_type(kv, monkeypatch) -> None:
    ctx, _ = kv
    take(ctx, None, "2026-11-01T00:00:00Z", monkeypatch)

    def failing(*args, **kwargs):
        raise kvlog_driver.DriverError("the tool died")

    monkeypatch.setattr(kvlog_driver.KvincrDriver, "backup_incremental", failing)
    labels = {"job": "kv", "method": "physical", "type": "incr", "result": "failure"}
    before = metrics.REGISTRY.get_sample_value("backupd_backup_runs_total", labels) or 0.0
    with pytest.raises(kvlog_driver.DriverError):
        take(ctx, "incr", "2026-11-01T01:00:00Z", monkeypatch)
    assert metrics.REGISTRY.get_sample_value("backupd_backup_runs_total", labels) == before + 1
    metrics.declare_job("kv2", ["physical"], archives_logs=False, capabilities=ctx.driver.capabilities)
    assert metrics.REGISTRY.get_sample_value("backupd_backup_runs_total", {**labels, "job": "kv2"}) == 0.0


def test_an_untrusted_parent_breaks_the_chain(tmp_path: Path, keys: Keys, monkeypatch) -> None:
    from backupd.sshsig import SigningKey

    kvlog_driver.install(monkeypatch)
    host = SigningKey.generate("backupd@host-a")
    key_file = tmp_path / "host-a.key"
    key_file.write_text(host.to_openssh())
    key_file.chmod(0o600)
    config = kv_config(tmp_path, keys)
    config.write_text(f'[signing]\nkey_file = "{key_file}"\ntrusted_keys = ["{host.public.line()}"]\n\n'
                      + config.read_text())
    ctx = JobContext(load_settings(config), "kv")
    store = kvlog_driver.KvStore(tmp_path / "kv")
    store.set("a", "1")
    take(ctx, None, "2026-11-01T00:00:00Z", monkeypatch)
    store.set("a", "2")
    incr1 = take(ctx, "incr", "2026-11-01T01:00:00Z", monkeypatch)
    store.set("a", "3")
    incr2 = take(ctx, "incr", "2026-11-01T02:00:00Z", monkeypatch)
    manifest = tmp_path / "repo" / "kv" / "backups" / incr1 / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"keys": 1', b'"keys": 9'))  # no longer what was signed

    with pytest.raises(BrokenChain, match=f"backup {incr2} needs its parent backup {incr1}, which is not trusted"):
        take(ctx, "incr", "2026-11-01T03:00:00Z", monkeypatch)
    with pytest.raises(BrokenChain, match=f"parent backup {incr1}, which is not trusted"):
        restored(ctx, tmp_path, incr2)


@pytest.mark.parametrize(("metadata", "problem"), [
    ({"type": "weekly"}, "unknown backup type 'weekly'"),
    ({"type": "incr"}, "an incr backup names no parent"),
    ({"type": "full", "parent": "20261101T000000Z"}, "a full backup names a parent (20261101T000000Z)"),
    ({"type": "incr", "parent": "../../../etc"}, "its parent '../../../etc' is not a backup id"),
    ({"type": "incr", "parent": "20261201T000000Z"}, "its parent 20261201T000000Z is not older than it"),
])
def test_a_hostile_type_or_parent_is_refused_in_one_line(kv, tmp_path: Path, monkeypatch, metadata, problem) -> None:
    ctx, _ = kv
    take(ctx, None, "2026-11-01T00:00:00Z", monkeypatch)
    backup_id = take(ctx, None, "2026-11-01T01:00:00Z", monkeypatch)
    if metadata.get("parent") == "20261201T000000Z":
        take(ctx, None, "2026-12-01T00:00:00Z", monkeypatch)
    path = tmp_path / "repo" / "kv" / "backups" / backup_id / "manifest.json"
    document = json.loads(path.read_text())
    document["metadata"] = {**document["metadata"], "parent": None, **metadata}
    path.write_text(json.dumps(document))
    with pytest.raises((BrokenChain, IntegrityError)) as refused:
        restored(ctx, tmp_path, backup_id)
    assert problem in str(refused.value) and "\n" not in str(refused.value)


def test_a_lock_wait_ends_when_the_run_is_cancelled(tmp_path: Path) -> None:
    import threading
    import time

    from backupd.errors import Aborted
    from backupd.locks import job_lock

    cancel = threading.Event()
    with job_lock(tmp_path, "kv"):
        threading.Timer(0.5, cancel.set).start()
        started = time.monotonic()
        with pytest.raises(Aborted, match="aborted while waiting for its lock"):
            with job_lock(tmp_path, "kv", wait=60, cancel=cancel):
                pass
        assert time.monotonic() - started < 5
