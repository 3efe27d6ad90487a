"""`restore --to` is checked per driver before anything is read or written; `--dry-run` reports what the
real run would refuse and exits non-zero. No database server is needed: a wrong --to is refused first."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from core_fixtures import Keys, SqliteJob
from support import BACKUPD, error_lines, run_backupd, write_config

JOBS: dict[str, dict[str, object]] = {
    "pg": {"driver": "postgres", "dsn": "postgresql://backup@127.0.0.1:1/shop"},
    "my": {"driver": "mysql", "dsn": "mysql://backup@127.0.0.1:1/"},
    "mongo": {"driver": "mongodb", "dsn": "mongodb://backup@127.0.0.1:1/"},
    "cache": {"driver": "redis", "dsn": "redis://127.0.0.1:1"},
    "lite": {"driver": "sqlite", "path": "/nonexistent/lite.sqlite3"},
}

PG = "a data directory (physical backups) or a postgresql:// URL (logical backups)"
MY = "a directory (physical backups) or a mysql:// URL (logical backups)"
REDIS = "a directory (that will hold dump.rdb)"
SQLITE = "a file path (the database file)"
MONGO = "a mongodb:// or mongodb+srv:// URL"

CASES = [
    ("pg", "", f"--to is empty: the postgres driver restores to {PG}"),
    ("pg", "redis://127.0.0.1/0", f"--to redis://127.0.0.1/0: the postgres driver restores to {PG}"),
    ("pg", "file.txt/data", "--to file.txt/data: {cwd}/file.txt is not a directory"),
    ("my", "postgresql://h/db", f"--to postgresql://h/db: the mysql driver restores to {MY}"),
    ("my", "", f"--to is empty: the mysql driver restores to {MY}"),
    ("mongo", "restored", f"--to restored: the mongodb driver restores to {MONGO}"),
    ("mongo", "", f"--to is empty: the mongodb driver restores to {MONGO}"),
    ("cache", "redis://127.0.0.1:6380", f"--to redis://127.0.0.1:6380: the redis driver restores to {REDIS}, not to a URL"),
    ("cache", "", f"--to is empty: the redis driver restores to {REDIS}"),
    ("cache", "file.txt", f"--to file.txt: exists and is not a directory; the redis driver restores to {REDIS}"),
    ("lite", "", f"--to is empty: the sqlite driver restores to {SQLITE}"),
    ("lite", "sqlite:///x.db", f"--to sqlite:///x.db: the sqlite driver restores to {SQLITE}, not to a URL"),
    ("lite", "somedir", f"--to somedir: is a directory; the sqlite driver restores to {SQLITE}"),
    ("lite", "missing/x.db", "--to missing/x.db: directory {cwd}/missing does not exist"),
]


@pytest.fixture
def config(tmp_path: Path, keys: Keys) -> Path:
    return write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        **{f"jobs.{name}": {**table, "storage": "main"} for name, table in JOBS.items()},
    })


@pytest.mark.parametrize(("job", "to", "message"), CASES, ids=[f"{j}-{t or 'empty'}" for j, t, _ in CASES])
@pytest.mark.parametrize("dry_run", [False, True], ids=["restore", "dry-run"])
def test_a_wrong_to_is_one_line_and_exit_2(config: Path, tmp_path: Path, job: str, to: str, message: str,
                                           dry_run: bool) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "file.txt").write_text("x")
    (cwd / "somedir").mkdir()
    before = sorted(p.name for p in cwd.iterdir())
    result = run_backupd("restore", job, "--to", to, *(["--dry-run"] if dry_run else []), config=config, cwd=cwd)
    assert result.code == 2, result.err
    assert error_lines(result.err) == [f"backupd: error: {message.format(cwd=cwd)}"]
    assert result.out == ""
    assert sorted(p.name for p in cwd.iterdir()) == before  # nothing written: no "redis:", no dump.rdb


def test_dry_run_exits_non_zero_where_the_restore_would_refuse(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    backup_id = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    existing = tmp_path / "live.sqlite3"
    existing.write_bytes(b"precious")

    dry = run_backupd("restore", "shop", "--to", str(existing), "--dry-run", config=sqlite_job.config)
    assert dry.code == 1
    assert dry.out.splitlines()[0] == "plan (dry run, nothing touched):" and backup_id in dry.out
    assert error_lines(dry.err) == [f"backupd: error: {existing}: file exists; refusing to overwrite it",
                                    "hint: pass --force to replace it"]
    real = run_backupd("restore", "shop", "--to", str(existing), config=sqlite_job.config)
    assert (real.code, error_lines(real.err)) == (dry.code, error_lines(dry.err))
    assert existing.read_bytes() == b"precious"

    forced = run_backupd("restore", "shop", "--to", str(existing), "--force", "--dry-run", config=sqlite_job.config)
    assert forced.code == 0 and backup_id in forced.out
    fresh = run_backupd("restore", "shop", "--to", str(tmp_path / "new.sqlite3"), "--dry-run", config=sqlite_job.config)
    assert fresh.code == 0 and not (tmp_path / "new.sqlite3").exists()


def test_a_directory_the_user_cannot_write_is_refused_up_front(keys: Keys) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run backupd as nobody")
    root = Path(tempfile.mkdtemp(prefix="backupd-to-", dir="/tmp"))
    try:
        os.chmod(root, 0o755)
        identity = root / "identity.txt"
        shutil.copy(keys.identity_file, identity)
        config = write_config(root / "backupd.toml", {
            "daemon": {"state_dir": str(root / "state")},
            "storage.main": {"type": "filesystem", "path": str(root / "repo")},
            "encryption": {"recipients": [keys.recipient], "identity_file": str(identity)},
            "jobs.lite": {**JOBS["lite"], "storage": "main"},
        })
        locked = root / "locked"
        locked.mkdir(mode=0o755)
        argv = ["runuser", "-u", "nobody", "--", *BACKUPD, "--config", str(config), "--log-format", "json",
                "restore", "lite", "--to", str(locked / "x.db")]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
        assert proc.returncode == 2, proc.stderr
        assert error_lines(proc.stderr) == [f"backupd: error: --to {locked}/x.db: directory {locked} is not "
                                            "writable by nobody"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
