"""Backup ids are unique across the jobs of a storage; an id two jobs hold is never picked silently."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path

from core_fixtures import Keys, make_sample_db, sqlite_job_config
from support import error_lines, require_tool, run_backupd, write_config

from backupd.repository import Repository
from backupd.timeutil import UTC
from storage.filesystem import FilesystemStorage, FilesystemOptions

FROZEN = "2026-11-24 02:00:00"  # faketime: the wall clock stands still there (UTC); monotonic runs
FROZEN_ID = "20261124T020000Z"


def two_jobs(tmp_path: Path, keys: Keys) -> Path:
    jobs: dict[str, dict[str, object]] = {}
    for name in ("billing", "shop"):
        db = tmp_path / f"{name}.sqlite3"
        make_sample_db(db, rows=200)
        jobs[f"jobs.{name}"] = {"driver": "sqlite", "path": str(db), "storage": "main"}
    return write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        **jobs,
    })


def backup_at_frozen_time(config: Path, job: str) -> str:
    require_tool("faketime")
    env = {"FAKETIME": FROZEN, "FAKETIME_DONT_FAKE_MONOTONIC": "1", "TZ": "UTC",
           "LD_PRELOAD": _libfaketime()}
    result = run_backupd("backup", job, config=config, env=env, check=True)
    return result.out.strip()


def _libfaketime() -> str:
    for candidate in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                      "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"):
        if os.path.exists(candidate):
            return candidate
    raise AssertionError("libfaketime.so.1 not found (Debian package faketime)")


def test_two_jobs_in_the_same_second_get_distinct_ids(tmp_path: Path) -> None:
    storage = FilesystemStorage(FilesystemOptions(type="filesystem", path=tmp_path / "repo"))
    moment = dt.datetime(2026, 11, 24, 2, 0, 0, tzinfo=UTC)
    first = Repository(storage, "billing").new_backup_id(moment)
    second = Repository(storage, "shop").new_backup_id(moment)
    assert (first, second) == (FROZEN_ID, f"{FROZEN_ID}-2")


def test_backups_started_in_the_same_second_are_told_apart(tmp_path: Path, keys: Keys) -> None:
    config = two_jobs(tmp_path, keys)
    ids = {job: backup_at_frozen_time(config, job) for job in ("billing", "shop")}
    assert ids == {"billing": FROZEN_ID, "shop": f"{FROZEN_ID}-2"}
    for job, backup_id in ids.items():
        shown = run_backupd("show", backup_id, "--json", config=config, check=True)
        assert json.loads(shown.out)["job"] == job
    pinned = run_backupd("pin", ids["shop"], config=config, check=True)
    assert pinned.out.strip() == f"pinned {FROZEN_ID}-2 of job shop"


def test_an_id_two_jobs_hold_is_refused_by_show_and_pin(tmp_path: Path, keys: Keys) -> None:
    config = two_jobs(tmp_path, keys)
    backup_at_frozen_time(config, "billing")
    (tmp_path / "repo" / "_ids" / FROZEN_ID).unlink()  # as written before ids were claimed across jobs
    assert backup_at_frozen_time(config, "shop") == FROZEN_ID

    for command in (("show", FROZEN_ID), ("pin", FROZEN_ID)):
        result = run_backupd(*command, config=config)
        assert result.code == 2, result.err
        assert error_lines(result.err) == [
            f"backupd: error: backup id {FROZEN_ID} is ambiguous: jobs billing, shop each have one",
            "hint: name the job with --job (one of: billing, shop)",
        ]
    shown = run_backupd("show", FROZEN_ID, "--job", "shop", "--json", config=config, check=True)
    assert json.loads(shown.out)["job"] == "shop"


def test_a_deleted_backup_gives_its_id_back(tmp_path: Path) -> None:
    storage = FilesystemStorage(FilesystemOptions(type="filesystem", path=tmp_path / "repo"))
    moment = dt.datetime(2026, 11, 24, 2, 0, 0, tzinfo=UTC)
    billing, shop = Repository(storage, "billing"), Repository(storage, "shop")
    assert billing.new_backup_id(moment) == FROZEN_ID
    shop.release_id(FROZEN_ID)  # not shop's claim: left alone
    assert shop.new_backup_id(moment) == f"{FROZEN_ID}-2"
    billing.release_id(FROZEN_ID)
    assert shop.new_backup_id(moment) == FROZEN_ID


def test_prune_gives_the_ids_of_pruned_backups_back(tmp_path: Path, keys: Keys) -> None:
    db = tmp_path / "shop.sqlite3"
    make_sample_db(db, rows=200)
    config = sqlite_job_config(tmp_path, keys, {"type": "filesystem", "path": str(tmp_path / "repo")}, db,
                               {"retention": {"keep_last": 1}})
    first = run_backupd("backup", "shop", config=config, check=True).out.strip()
    time.sleep(1.1)  # a second backup in another second: its own id
    second = run_backupd("backup", "shop", config=config, check=True).out.strip()
    assert sorted(p.name for p in (tmp_path / "repo" / "_ids").iterdir()) == sorted([first, second])
    run_backupd("prune", "shop", config=config, check=True)
    assert [p.name for p in (tmp_path / "repo" / "_ids").iterdir()] == [second]
