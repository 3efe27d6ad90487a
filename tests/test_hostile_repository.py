"""What the repository holds is hostile input: reports keep restored text sealed, manifests are
parsed within bounds and shown safely, and one bad manifest does not block the other backups."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Iterator

import pytest

from backupd import age, metrics, plugins, sealed
from backupd.cli.main import main
from backupd.context import JobContext
from backupd.errors import EXIT_VERIFY_BAD
from backupd.settings import load_settings
from core_fixtures import Keys, SqliteJob
from daemon_support import PLUGINS
from support import error_lines, run_backupd, write_config

SECRET = "tbl_AGE-SECRET-KEY-1SMUGGLED"  # what a hostile dump could make a table name or an error say


def repository_text(root: Path) -> str:
    """Every byte of every object under ``root`` that is not a stream, as text."""
    texts = []
    for path in root.rglob("*"):
        if path.is_file() and not path.name.endswith(".zst.age"):
            texts.append(path.read_text(errors="replace"))
    return "\n".join(texts)


def backup(job: SqliteJob) -> str:
    return run_backupd("backup", "shop", config=job.config, check=True).out.strip()


def manifest_path(job: SqliteJob, backup_id: str) -> Path:
    assert job.repo_root is not None
    return job.repo_root / "shop" / "backups" / backup_id / "manifest.json"


# -- sealed: reports, last-failure, audit ------------------------------------------------------

def test_verify_report_keeps_table_names_and_problems_sealed(sqlite_job: SqliteJob) -> None:
    db = sqlite3.connect(sqlite_job.db)
    db.execute(f'CREATE TABLE "{SECRET}" (x)')
    db.execute(f'INSERT INTO "{SECRET}" VALUES (1)')
    db.commit()
    db.close()
    backup_id = backup(sqlite_job)
    manifest = json.loads(manifest_path(sqlite_job, backup_id).read_text())
    manifest["row_counts"][SECRET] = 2  # the restored count (1) will disagree: a problem naming the table
    manifest_path(sqlite_job, backup_id).write_text(json.dumps(manifest))
    result = run_backupd("verify", "shop", config=sqlite_job.config)
    assert result.code == EXIT_VERIFY_BAD
    assert f"table {SECRET}: 1 rows restored, the manifest says 2" in result.out  # the operator sees it

    assert sqlite_job.repo_root is not None
    reports = list((sqlite_job.repo_root / "shop" / "verify").glob("*.json"))
    assert len(reports) == 1
    stored = json.loads(reports[0].read_text())
    assert SECRET not in reports[0].read_text()
    audit = list((sqlite_job.repo_root / "shop" / "audit").glob("*.json"))
    assert audit and all(SECRET not in path.read_text() for path in audit)
    # readable without a key: what the daemon and metrics need
    assert stored["result"] == "failed" and stored["backup_id"] == backup_id and stored["mode"] == "full"
    assert stored["started_at"] and stored["finished_at"] and isinstance(stored["restore_seconds"], float)
    assert stored["summary"]["problems"] == 1 and stored["summary"]["tables_found"] == 3
    assert "problems" not in stored and "counts_found" not in stored
    assert stored["sealed"].startswith("-----BEGIN AGE ENCRYPTED FILE-----")
    # with the identity, the whole report comes back
    settings = load_settings(sqlite_job.config)
    ctx = JobContext(settings, "shop")
    try:
        key = f"shop/verify/{reports[0].name}"
        opened = ctx.repository.read_report(key, ctx.identities)
        assert opened["problems"] == [f"table {SECRET}: 1 rows restored, the manifest says 2"]
        assert opened["counts_found"][SECRET] == 1
        assert "sealed" in ctx.repository.read_report(key)  # no key: the sealed part stays sealed
    finally:
        ctx.close()
    # and age itself reads it, as it reads the streams
    opened_by_age = age.decrypt(ctx.identities, age.dearmor(stored["sealed"].encode()))
    assert SECRET in opened_by_age.decode()


def test_last_failure_in_the_repository_keeps_the_error_sealed(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    missing = tmp_path / f"{SECRET}.sqlite3"
    config = write_config(tmp_path / "failing.toml", {
        "daemon": {"state_dir": str(sqlite_job.state_dir)},
        "storage.main": {"type": "filesystem", "path": str(sqlite_job.repo_root)},
        "encryption": {"recipients": [sqlite_job.keys.recipient], "identity_file": str(sqlite_job.keys.identity_file)},
        "jobs.shop": {"driver": "sqlite", "path": str(missing), "storage": "main"},
    })
    result = run_backupd("backup", "shop", config=config)
    assert result.code == 1 and SECRET in result.err  # the operator's own terminal says what failed
    assert sqlite_job.repo_root is not None
    record = sqlite_job.repo_root / "shop" / "state" / "last-failure.json"
    stored = json.loads(record.read_text())
    assert stored["result"] == "failure" and "at" in stored
    assert SECRET not in repository_text(sqlite_job.repo_root)
    opened = sealed.unseal(stored, [sqlite_job.keys.identity])
    assert SECRET in opened["error"]
    local = json.loads((sqlite_job.state_dir / "runs" / "shop.json").read_text())  # 0600 on this host
    assert SECRET in local["error"]


# -- a scratch restore rejecting the content is a failed verification -----------------------

@pytest.fixture
def test_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(PLUGINS))
    plugins._entry_points.cache_clear()
    plugins._load.cache_clear()
    yield
    monkeypatch.undo()
    plugins._entry_points.cache_clear()
    plugins._load.cache_clear()


def test_scratch_restore_rejecting_the_content_is_exit_3_with_a_report(keys: Keys, tmp_path: Path, test_plugins,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = write_config(tmp_path / "c.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.slow": {"driver": "slowtest", "workdir": str(workdir), "size": 4096, "storage": "main",
                      "verify_error": f"ERROR: relation {SECRET} does not exist"},
    })
    assert main(["--config", str(config), "--log-level", "error", "backup", "slow"]) == 0
    metrics.VERIFICATION_LAST_RESULT.labels("slow").set(1)
    capsys.readouterr()
    assert main(["--config", str(config), "--log-level", "error", "verify", "slow"]) == EXIT_VERIFY_BAD
    out = capsys.readouterr().out
    assert f"scratch restore rejected the backup: ERROR: relation {SECRET} does not exist" in out
    assert metrics.REGISTRY.get_sample_value("backupd_verification_last_result", {"job": "slow"}) == 0
    reports = list((tmp_path / "repo" / "slow" / "verify").glob("*.json"))
    assert len(reports) == 1 and json.loads(reports[0].read_text())["result"] == "failed"
    assert SECRET not in repository_text(tmp_path / "repo")


# -- show escapes, manifests bounded -------------------------------------------------------------

def test_show_escapes_terminal_control_sequences(sqlite_job: SqliteJob) -> None:
    backup_id = backup(sqlite_job)
    path = manifest_path(sqlite_job, backup_id)
    manifest = json.loads(path.read_text())
    manifest["host"] = "db1\x1b]0;owned\x07\x1b[2J"
    manifest["row_counts"]["orders\x1b[31m\nfake line"] = 1
    manifest["metadata"]["note"] = "\u202eevil\x9b"
    path.write_text(json.dumps(manifest))
    shown = run_backupd("show", backup_id, config=sqlite_job.config, check=True).out
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown and "\x9b" not in shown
    assert "host        db1\\x1b]0;owned\\x07\\x1b[2J" in shown
    assert "  orders\\x1b[31m\\nfake line  1" in shown
    assert "fake line" not in [line.strip() for line in shown.splitlines()]
    assert "\\u202eevil\\x9b" in shown
    listed = run_backupd("list", config=sqlite_job.config, check=True).out
    assert "\x1b" not in listed
    as_json = run_backupd("show", backup_id, "--json", config=sqlite_job.config, check=True).out
    assert "\x1b" not in as_json and json.loads(as_json)["host"] == manifest["host"]
    # an error quoting the manifest is escaped too
    manifest["job"] = "shop\x1b]2;owned\x07"
    path.write_text(json.dumps(manifest))
    refused = run_backupd("show", backup_id, config=sqlite_job.config)
    assert refused.code == EXIT_VERIFY_BAD
    assert "\x1b" not in refused.err and "\x07" not in refused.err
    assert "of job shop\\x1b]2;owned\\x07" in refused.err


@pytest.mark.parametrize("content, message", [
    (b'{"format_version": 1, "metadata": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "JSON nested"),
    (b'{"format_version": 1, "metadata": ' + b'{"a":' * 100 + b"1" + b"}" * 100 + b"}", "nested deeper than 64"),
    (b'{"format_version": 1, "objects": [], "backup_id": ["x"]}', "unreadable manifest (TypeError: backup_id is not a str)"),
    (b"\xff\xfe garbage", "unreadable manifest"),
])
def test_hostile_manifest_is_a_one_line_error_naming_it(sqlite_job: SqliteJob, content: bytes,
                                                          message: str) -> None:
    backup_id = backup(sqlite_job)
    manifest_path(sqlite_job, backup_id).write_bytes(content)
    for args in (("show", backup_id), ("verify", "shop", "--backup", backup_id)):
        result = run_backupd(*args, config=sqlite_job.config)
        lines = error_lines(result.err)
        assert result.code == EXIT_VERIFY_BAD, result.err
        assert len(lines) == 1 and lines[0].startswith(
            f"backupd: error: shop/backups/{backup_id}/manifest.json: "), result.err
        assert message in lines[0] and "internal error" not in result.err


def test_oversized_manifest_is_not_read(sqlite_job: SqliteJob) -> None:
    backup_id = backup(sqlite_job)
    with open(manifest_path(sqlite_job, backup_id), "wb") as handle:
        handle.write(b'{"pad": "')
        handle.write(b"x" * (64 << 20))
        handle.write(b'"}')
    result = run_backupd("show", backup_id, config=sqlite_job.config)
    assert result.code == EXIT_VERIFY_BAD
    assert (f"shop/backups/{backup_id}/manifest.json: manifest larger than the limit of {64 << 20} bytes; not read"
            in result.err)


# -- one bad manifest does not block the others ----------------------------------------------

def test_a_bad_manifest_blocks_neither_restore_nor_verify_of_the_others(sqlite_job: SqliteJob,
                                                                         tmp_path: Path) -> None:
    older = backup(sqlite_job)
    newer = backup(sqlite_job)
    original = manifest_path(sqlite_job, older).read_bytes()
    manifest_path(sqlite_job, older).write_text('{"format_version": 1, "lying": true}')
    # manifests are written once; the index derived from them sees an edit in place once rebuilt (issue 22)
    (sqlite_job.repo_root / "shop" / "index.json").unlink()
    target = tmp_path / "r1.sqlite3"
    run_backupd("restore", "shop", "--to", str(target), "--backup", newer, config=sqlite_job.config, check=True)
    assert target.exists()
    assert run_backupd("verify", "shop", "--backup", newer, config=sqlite_job.config).code == 0
    listed = run_backupd("list", "--json", config=sqlite_job.config, check=True)
    assert [b["backup_id"] for b in json.loads(listed.out)["backups"]] == [newer]
    assert older in listed.err and "manifest is unusable" in listed.err

    # now the newest one lies: choosing "the newest" skips it, with a warning naming it
    manifest_path(sqlite_job, older).write_bytes(original)
    manifest_path(sqlite_job, newer).write_text("[]")
    verified = run_backupd("verify", "shop", config=sqlite_job.config)
    assert verified.code == 0, verified.err
    assert f"{older}  full  ok" in verified.out
    assert newer in verified.err and "backup skipped: its manifest is unusable" in verified.err
    target = tmp_path / "r2.sqlite3"
    restored = run_backupd("restore", "shop", "--to", str(target), config=sqlite_job.config, check=True)
    assert older in restored.out
    # integrity verification of every backup names the bad one as failed
    integrity = run_backupd("verify", "shop", "--integrity-only", config=sqlite_job.config)
    assert integrity.code == EXIT_VERIFY_BAD
    assert f"{older}  integrity  ok" in integrity.out and f"{newer}  integrity  BAD" in integrity.out
    assert f"shop/backups/{newer}/manifest.json: unreadable manifest" in integrity.out
    # the named bad one fails on its own, naming itself
    named = run_backupd("restore", "shop", "--to", str(tmp_path / "r3.sqlite3"), "--backup", newer,
                        config=sqlite_job.config)
    assert named.code == EXIT_VERIFY_BAD and f"shop/backups/{newer}/manifest.json" in named.err
