"""The index read lazily (backupd/indexread.py): a command parses the entries it uses, not all of them;
an index written before summaries is read whole; a summary that lies is caught (issue 22)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backupd.cli.main import main
from backupd.context import JobContext
from backupd.index import IndexedBackup
from backupd.settings import load_settings
from core_fixtures import sqlite_job_config
from scale_support import scale

BACKUPS = 40
#: Backup N starts at hour N and finishes a minute later: at hour 17.5 the newest finished one is backup 17.
TARGET = "2024-01-01T17:30:00Z"


def repository(tmp_path: Path, keys) -> Path:  # noqa: F811
    scale.build_fs(tmp_path / "repo", BACKUPS, 10)
    config = sqlite_job_config(tmp_path, keys, {"type": "filesystem", "path": str(tmp_path / "repo")},
                               tmp_path / "db.sqlite3")
    ctx = JobContext(load_settings(config), "shop")
    assert len(ctx.repository.backup_ids()) == BACKUPS  # the first read builds and stores the index
    ctx.close()
    return config


def restore_by_time(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["--config", str(config), "--log-level", "error", "restore", "shop", "--to",
                 str(tmp_path / "restored.sqlite3"), "--dry-run", "--target-time", TARGET])
    return code, capsys.readouterr().out


def parsed_entries(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    parsed: list[str] = []
    plain = IndexedBackup.from_entry.__func__  # type: ignore[attr-defined]

    def counting(cls: type[IndexedBackup], data: object, job: str) -> IndexedBackup:
        entry = plain(cls, data, job)
        parsed.append(entry.backup_id)
        return entry

    monkeypatch.setattr(IndexedBackup, "from_entry", classmethod(counting))
    return parsed


def test_restore_by_time_parses_only_the_entry_it_chooses(tmp_path: Path, keys, monkeypatch,  # noqa: F811
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = repository(tmp_path, keys)
    stored = (tmp_path / "repo" / "shop" / "index.json").read_bytes()
    assert stored.count(b"\n") == BACKUPS + 2  # the head, one line per entry, the tail
    assert json.loads(stored)["index"]["backup_summary"]["backup_ids"] == [scale.backup_id(n) for n in range(BACKUPS)]
    parsed = parsed_entries(monkeypatch)
    code, out = restore_by_time(config, tmp_path, capsys)
    assert code == 0 and f"restore backup {scale.backup_id(17)}" in out
    assert parsed == [scale.backup_id(17)]


def test_an_index_written_before_summaries_is_read_whole(tmp_path: Path, keys, monkeypatch,  # noqa: F811
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    config = repository(tmp_path, keys)
    path = tmp_path / "repo" / "shop" / "index.json"
    document = json.loads(path.read_bytes())
    del document["index"]["backup_summary"]
    path.write_text(json.dumps(document))  # one line, as backupd wrote it before
    parsed = parsed_entries(monkeypatch)
    code, out = restore_by_time(config, tmp_path, capsys)
    assert code == 0 and f"restore backup {scale.backup_id(17)}" in out
    assert len(parsed) == BACKUPS
    assert path.read_text() == json.dumps(document)  # read, not rewritten


def test_an_entry_that_contradicts_the_summary_is_refreshed(tmp_path: Path, keys,  # noqa: F811
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """As an entry that no longer matches its manifest: the manifest is the truth, the entry rewritten from it."""
    config = repository(tmp_path, keys)
    path = tmp_path / "repo" / "shop" / "index.json"
    lines = path.read_bytes().split(b"\n")
    chosen = 1 + 17  # the head, then backup 0's line
    assert scale.backup_id(17).encode() in lines[chosen]
    lines[chosen] = lines[chosen].replace(b'"finished_at":"2024-01-01T17:01:00Z"', b'"finished_at":"2024-01-01T17:02:00Z"')
    path.write_bytes(b"\n".join(lines))
    code, out = restore_by_time(config, tmp_path, capsys)
    assert code == 0 and f"restore backup {scale.backup_id(17)}" in out
    assert b'"finished_at":"2024-01-01T17:01:00Z"' in path.read_bytes().split(b"\n")[chosen]


def test_a_summary_naming_no_backup_id_rebuilds_the_index(tmp_path: Path, keys,  # noqa: F811
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = repository(tmp_path, keys)
    path = tmp_path / "repo" / "shop" / "index.json"
    raw = path.read_bytes()
    path.write_bytes(raw.replace(f'"{scale.backup_id(3)}",'.encode(), b'"../../etc",', 1))
    code, out = restore_by_time(config, tmp_path, capsys)
    assert code == 0 and f"restore backup {scale.backup_id(17)}" in out
    assert b"../../etc" not in path.read_bytes()  # rebuilt from the manifests and stored again


def test_ids_with_suffixes_keep_their_order_and_pending_ones_are_left_out() -> None:
    from backupd import index
    from backupd.manifest import Manifest

    base = scale.backup_id(0)
    ids = [base, f"{base}-2", f"{base}-10", scale.backup_id(1)]  # "-10" sorts after "-2"
    written = index.Index("shop")
    for number, backup_id in enumerate(ids):
        manifest = Manifest.from_json(scale.manifest(number))
        manifest.backup_id = backup_id
        written.put(IndexedBackup.of(manifest, "unsigned", None, pending=backup_id == f"{base}-10"))
    read = index.parse(written.to_bytes(None), "shop", (), "shop/index.json")
    assert read.ids() == [base, f"{base}-2", scale.backup_id(1)]
    assert [b.backup_id for b in read.usable()] == [scale.backup_id(1), f"{base}-2", base]
    assert [b.backup_id for b in read.backups] == ids and read.backups[2].pending
    assert read.backups[1].manifest_sha256 == written.backups[1].manifest_sha256
