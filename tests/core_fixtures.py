"""Fixtures for the core: keys, a SQLite job on either storage, configs."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from backupd import age
from backupd.storage import Storage
from storage.filesystem import FilesystemStorage
from storage.s3 import S3Options, S3Storage
from support import write_config


@dataclass
class Keys:
    identity: age.X25519Identity
    recipient: str
    identity_file: Path


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    identity = age.X25519Identity.generate()
    path = tmp_path / "identity.txt"
    path.write_text(f"# test key\n# public key: {identity.to_recipient()}\n{identity}\n")
    path.chmod(0o600)
    return Keys(identity, str(identity.to_recipient()), path)


def make_sample_db(path: Path, rows: int = 2000) -> dict[str, int]:
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);"
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer INTEGER, note TEXT);"
    )
    db.executemany("INSERT INTO customers VALUES (?, ?)", [(i, f"c{i}") for i in range(rows // 10)])
    db.executemany("INSERT INTO orders VALUES (?, ?, ?)", [(i, i % 97, f"order {i}" * 3) for i in range(rows)])
    db.commit()
    db.close()
    return {"customers": rows // 10, "orders": rows}


@dataclass
class SqliteJob:
    config: Path
    db: Path
    repo_root: Path | None
    counts: dict[str, int]
    keys: Keys
    state_dir: Path


def sqlite_job_config(tmp_path: Path, keys: Keys, storage_table: dict[str, object], db: Path,
                      extra_job: dict[str, object] | None = None) -> Path:
    return write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": storage_table,
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.shop": {"driver": "sqlite", "path": str(db), "storage": "main",
                      "verify": {"checks": ["SELECT count(*) > 0 FROM orders"]}, **(extra_job or {})},
    })


@pytest.fixture
def sqlite_job(tmp_path: Path, keys: Keys) -> SqliteJob:
    db = tmp_path / "shop.sqlite3"
    counts = make_sample_db(db)
    repo = tmp_path / "repo"
    config = sqlite_job_config(tmp_path, keys, {"type": "filesystem", "path": str(repo)}, db)
    return SqliteJob(config, db, repo, counts, keys, tmp_path / "state")


@dataclass
class Repo:
    table: dict[str, object]  # the job's storage table
    storage: Storage  # the same repository, as an attacker with write access sees it


@pytest.fixture(params=["filesystem", "s3"])
def repository(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Repo]:
    """A job's repository on each backend in turn (S3: moto, under prefix "prod/")."""
    if request.param == "filesystem":
        table: dict[str, object] = {"type": "filesystem", "path": str(tmp_path / "repo")}
        storage: Storage = FilesystemStorage(tmp_path / "repo")
    else:
        endpoint = request.getfixturevalue("moto_server")
        bucket = request.getfixturevalue("s3_bucket")
        table = {"type": "s3", "bucket": bucket, "prefix": "prod/", "endpoint_url": endpoint}
        storage = S3Storage(S3Options(bucket=bucket, prefix="prod/", endpoint_url=endpoint, region="us-east-1"))
    with storage:
        yield Repo(table, storage)
