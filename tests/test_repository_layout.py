"""The repository layout is one contract (DESIGN.md "Repository format"), formatted in one place
(``backupd.repository.Layout``), and commands that name a backup read only that backup's manifest."""

from __future__ import annotations

from pathlib import Path

from backupd.repository import Layout
from core_fixtures import SqliteJob
from support import run_backupd

BACKUP = "20261124T020000Z"


def test_every_key_is_where_the_design_says() -> None:
    layout = Layout("shop")
    assert layout.manifest_key(BACKUP) == f"shop/backups/{BACKUP}/manifest.json"
    assert layout.object_key(BACKUP, "db") == f"shop/backups/{BACKUP}/db.zst.age"
    assert layout.log_key("wal", "00000001/000000010000000000000003") == \
        "shop/wal/00000001/0000000100000000/000000010000000000000003.zst.age"
    assert layout.log_key("wal", "00000001/0000000100000000000000FF.partial") == \
        "shop/wal/00000001/0000000100000000/0000000100000000000000FF.partial.zst.age"
    assert layout.log_key("wal", "00000002/00000002.history") == "shop/wal/00000002/00000002.history.zst.age"
    assert layout.log_key("wal", "00000001/000000010000000000000003.00000028.backup") == \
        "shop/wal/00000001/000000010000000000000003.00000028.backup.zst.age"
    # the layout before folders is still read
    assert layout.legacy_log_key("wal", "00000001/000000010000000000000003") == \
        "shop/wal/00000001/000000010000000000000003.zst.age"
    assert layout.legacy_log_key("wal", "00000002/00000002.history") is None
    for key in ("shop/wal/00000001/0000000100000000/000000010000000000000003.zst.age",
                "shop/wal/00000001/000000010000000000000003.zst.age"):
        assert layout.log_name("wal", key) == "00000001/000000010000000000000003"
    assert layout.log_key("binlog", "1/mysql-bin.000003") == "shop/binlog/1/mysql-bin.000003.zst.age"
    assert layout.log_name("oplog", "shop/oplog/1-2.bson.zst.age") == "1-2.bson"
    assert layout.log_name("oplog", "shop/oplog/1-2.bson.tmp") is None
    assert layout.pin_key(BACKUP) == f"shop/pins/{BACKUP}"
    assert layout.pinned_id(f"shop/pins/{BACKUP}") == BACKUP and layout.pinned_id("shop/pins/notes") is None
    assert layout.journal_key() == "shop/state/prune.json"
    assert layout.failure_key() == "shop/state/last-failure.json"
    assert layout.report_key("2026-11-24T02:10:00.5Z", BACKUP) == f"shop/verify/20261124T021000.5Z-{BACKUP}.json"
    assert layout.audit_key("2026-11-24T02:10:00Z", "db 1/x", 42, "abcd1234") == \
        "shop/audit/20261124T021000Z-db_1_x-42-abcd1234.json"
    assert Layout.claim_key(BACKUP) == f"_ids/{BACKUP}"


def backup(job: SqliteJob) -> str:
    return run_backupd("backup", "shop", config=job.config, check=True).out.strip()


def test_naming_a_backup_reads_only_its_manifest(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    older = backup(sqlite_job)
    newer = backup(sqlite_job)
    assert sqlite_job.repo_root is not None
    # were it read, this manifest would be skipped with a warning naming it
    (sqlite_job.repo_root / "shop" / "backups" / older / "manifest.json").write_text("[]")
    target = tmp_path / "restored.sqlite3"
    restored = run_backupd("restore", "shop", "--to", str(target), "--backup", newer, config=sqlite_job.config,
                           check=True)
    assert newer in restored.out and target.exists()
    assert "unusable" not in restored.err, restored.err
    shown = run_backupd("show", newer, config=sqlite_job.config, check=True)
    assert newer in shown.out and "unusable" not in shown.err
    integrity = run_backupd("verify", "shop", "--integrity-only", "--backup", newer, config=sqlite_job.config,
                            check=True)
    assert f"{newer}  integrity  ok" in integrity.out and "unusable" not in integrity.err
    # without a name, the index chooses and only the chosen manifest is read (issue 22)
    unnamed = run_backupd("restore", "shop", "--to", str(tmp_path / "again.sqlite3"), config=sqlite_job.config,
                          check=True)
    assert newer in unnamed.out and "unusable" not in unnamed.err
    # checking every backup reads every manifest: the bad one is named
    every = run_backupd("verify", "shop", "--integrity-only", config=sqlite_job.config)
    assert every.code == 3 and older in every.out + every.err
