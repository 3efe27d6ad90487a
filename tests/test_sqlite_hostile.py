"""A hostile SQLite backup cannot reach the host during verification.

The integrity check, the row counts and the user's checks run in the sandbox
on the scratch copy only: SQL cannot write a copy of the database to a host
path (``VACUUM INTO``), ATTACH a host file, or see the identity file; a file
that is not a database is a failed verification (exit 3), and every copy
backupd writes is 0600 whatever the umask.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from backupd import age
from backupd.pipeline import encode_bytes
from core_fixtures import SqliteJob, make_sample_db, sqlite_job_config
from support import require_tool, run_backupd


def plant(job: SqliteJob, backup_id: str, data: bytes) -> None:
    """Replace the backup's object with ``data`` (as a repository writer could); fix the manifest to match."""
    stored = encode_bytes(data, [age.X25519Recipient.parse(job.keys.recipient)])
    directory = job.repo_root / "shop" / "backups" / backup_id
    (directory / "db.zst.age").write_bytes(stored)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["objects"][0].update(raw_size=len(data), stored_size=len(stored),
                                  sha256=hashlib.sha256(stored).hexdigest())
    (directory / "manifest.json").write_text(json.dumps(manifest))
    (job.repo_root / "shop" / "index.json").unlink(missing_ok=True)


def test_checks_cannot_write_or_attach_host_files(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    require_tool("bwrap")
    secret = tmp_path / "secret.sqlite3"
    make_sample_db(secret, rows=10)
    stolen = tmp_path / "stolen.sqlite3"
    checks = [f"VACUUM INTO '{stolen}'", f"ATTACH DATABASE '{secret}' AS s",
              f"SELECT count(*) FROM pragma_table_list WHERE schema = 's'",
              "SELECT count(*) > 0 FROM orders"]
    config = sqlite_job_config(tmp_path, sqlite_job.keys, {"type": "filesystem", "path": str(sqlite_job.repo_root)},
                               sqlite_job.db, {"verify": {"checks": checks}})
    run_backupd("backup", "shop", config=config, check=True)
    result = run_backupd("verify", "shop", "--json", config=config)
    assert result.code == 3, result.out + result.err
    report = json.loads(result.out)["reports"][0]
    found = {c["check"]: (c["ok"], c["detail"]) for c in report["checks"]}
    assert not stolen.exists()  # unsandboxed, this wrote a full copy of the restored database here
    assert found[checks[0]][0] is False
    assert found[checks[1]] == (False, "error: not authorized")
    assert found[checks[2]][0] is False
    assert found[checks[3]] == (True, "") and found["PRAGMA integrity_check"] == (True, "ok")
    assert report["counts_found"] == report["counts_expected"] == sqlite_job.counts


SPY = """import json, os, sys
request = json.load(sys.stdin)
seen = {"uid": os.getuid(), "identity": os.path.exists(IDENTITY), "config": os.path.exists(CONFIG),
        "root": os.path.exists("/root") and bool(os.listdir("/root")), "db": os.path.exists(request["path"]),
        "can_write_tmp_path": os.access(os.path.dirname(CONFIG), os.W_OK)}
json.dump({"integrity": ["ok"], "counts": {}, "checks": [[json.dumps(seen), True, ""]]}, sys.stdout)
"""


def test_the_checks_run_sandboxed(sqlite_job: SqliteJob, tmp_path: Path, monkeypatch) -> None:
    """What the sandboxed process can see: the scratch copy, not the identity, the config or /root."""
    import tempfile
    from types import SimpleNamespace

    import drivers.sqlite.driver
    from backupd.context import JobContext
    from backupd.restore import RepositorySource
    from backupd.settings import load_settings

    require_tool("bwrap")
    run_backupd("backup", "shop", config=sqlite_job.config, check=True)
    spy = tmp_path / "spy.py"
    spy.write_text(SPY.replace("IDENTITY", repr(str(sqlite_job.keys.identity_file)))
                   .replace("CONFIG", repr(str(sqlite_job.config))))
    monkeypatch.setattr(drivers.sqlite.driver, "sqlite_probe", SimpleNamespace(__file__=str(spy)))
    ctx = JobContext(load_settings(sqlite_job.config), "shop")
    manifest = ctx.repository.resolve(None)
    source = RepositorySource(ctx.repository, manifest, ctx.identities, str(ctx.identity_file))
    scratch = Path(tempfile.mkdtemp(prefix="backupd-verify-test-"))
    try:
        outcome = ctx.driver.verify(source, scratch, [])
    finally:
        import shutil
        shutil.rmtree(scratch, ignore_errors=True)
    seen = json.loads(outcome.checks[-1].name)
    assert seen == {"uid": seen["uid"], "identity": False, "config": False, "root": False, "db": True,
                    "can_write_tmp_path": False}
    if os.geteuid() == 0:
        assert seen["uid"] != 0


def test_a_file_that_is_no_database_fails_verification(sqlite_job: SqliteJob) -> None:
    backup_id = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    plant(sqlite_job, backup_id, b"SQLite format 3\0" + os.urandom(4000))
    result = run_backupd("verify", "shop", config=sqlite_job.config)
    assert result.code == 3, result.out + result.err
    assert "the restored file is not a readable SQLite database" in result.out
    assert "Traceback" not in result.err
    assert list((sqlite_job.repo_root / "shop" / "verify").glob("*.json"))


def test_restored_copy_is_private_under_umask_022(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        run_backupd("backup", "shop", config=sqlite_job.config, check=True)
        target = tmp_path / "restored.sqlite3"
        run_backupd("restore", "shop", "--to", str(target), config=sqlite_job.config, check=True)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
