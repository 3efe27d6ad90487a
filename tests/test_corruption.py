"""A damaged object is caught by sha256 (no key) and by the AEAD, never restored as good."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from backupd import age
from core_fixtures import SqliteJob
from support import error_lines, require_tool, run_backupd


def object_path(job: SqliteJob, backup_id: str) -> Path:
    return job.repo_root / "shop" / "backups" / backup_id / "db.zst.age"


@pytest.fixture
def backed_up(sqlite_job: SqliteJob) -> tuple[SqliteJob, str]:
    backup_id = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    return sqlite_job, backup_id


@pytest.mark.parametrize("where", ["header", "first-chunk", "middle", "last-byte"])
def test_flipped_byte_is_caught_by_integrity_check_and_by_decryption(backed_up, tmp_path: Path, where: str) -> None:
    job, backup_id = backed_up
    path = object_path(job, backup_id)
    data = bytearray(path.read_bytes())
    offset = {"header": 20, "first-chunk": data.index(b"\n---") + 120, "middle": len(data) // 2,
              "last-byte": len(data) - 1}[where]
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))

    integrity = run_backupd("verify", "shop", "--integrity-only", config=job.config)
    assert integrity.code == 3
    assert f"shop/backups/{backup_id}/db.zst.age: sha256 differs from the manifest's" in integrity.out

    # Decryption alone also refuses it: restore reads through the AEAD.
    restore = run_backupd("restore", "shop", "--to", str(tmp_path / "out.db"), config=job.config)
    assert restore.code != 0
    message = " ".join(error_lines(restore.err))
    assert "db.zst.age" in message and ("decryption failed" in message or "sha256" in message or "header" in message)
    assert not (tmp_path / "out.db").exists()

    full = run_backupd("verify", "shop", config=job.config)
    assert full.code == 3


def test_decryption_alone_catches_a_flip_the_manifest_agrees_with(backed_up, tmp_path: Path) -> None:
    """Even with the manifest's sha256 rewritten to match, the AEAD tag fails."""
    import hashlib

    job, backup_id = backed_up
    path = object_path(job, backup_id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x80
    path.write_bytes(bytes(data))
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["objects"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    manifest_path.write_text(json.dumps(manifest))

    assert run_backupd("verify", "shop", "--integrity-only", config=job.config).code == 0
    restore = run_backupd("restore", "shop", "--to", str(tmp_path / "out.db"), config=job.config)
    assert restore.code == 1
    assert "decryption failed, object corrupt or truncated" in restore.err
    assert not (tmp_path / "out.db").exists()
    full = run_backupd("verify", "shop", config=job.config)
    assert full.code == 3 and "decryption failed" in full.out


@pytest.mark.parametrize("keep", [0, 10, "half", -1])
def test_truncated_object_is_caught(backed_up, tmp_path: Path, keep) -> None:
    job, backup_id = backed_up
    path = object_path(job, backup_id)
    data = path.read_bytes()
    cut = {"half": len(data) // 2}.get(keep, keep)
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    integrity = run_backupd("verify", "shop", "--integrity-only", config=job.config)
    assert integrity.code == 3
    assert "differs from the manifest" in integrity.out
    assert run_backupd("restore", "shop", "--to", str(tmp_path / "out.db"), config=job.config).code != 0
    assert not (tmp_path / "out.db").exists()


def test_missing_object_is_caught(backed_up) -> None:
    job, backup_id = backed_up
    object_path(job, backup_id).unlink()
    result = run_backupd("verify", "shop", "--integrity-only", config=job.config)
    assert result.code == 3 and "object is missing" in result.out


def test_integrity_check_needs_no_private_key(backed_up) -> None:
    job, _ = backed_up
    job.keys.identity_file.unlink()
    result = run_backupd("verify", "shop", "--integrity-only", config=job.config)
    assert result.code == 0, result.err


def test_wrong_identity_is_a_one_line_error_naming_the_key_file(backed_up, tmp_path: Path) -> None:
    job, _ = backed_up
    job.keys.identity_file.write_text(str(age.X25519Identity.generate()) + "\n")
    restore = run_backupd("restore", "shop", "--to", str(tmp_path / "out.db"), config=job.config)
    assert restore.code == 1
    lines = error_lines(restore.err)
    assert len([line for line in lines if line.startswith("backupd: error:")]) == 1
    assert str(job.keys.identity_file) in lines[0] and "wrong key" in lines[0]
    verify = run_backupd("verify", "shop", config=job.config)
    assert verify.code == 1  # could not run: not a verdict on the backup
    assert str(job.keys.identity_file) in verify.err


def test_unreadable_identity_file(backed_up, tmp_path: Path) -> None:
    job, _ = backed_up
    job.keys.identity_file.write_text("AGE-SECRET-KEY-1NOTAKEY\n")
    result = run_backupd("restore", "shop", "--to", str(tmp_path / "out.db"), config=job.config)
    assert result.code == 1 and f"identity file {job.keys.identity_file}" in result.err


def test_object_opens_with_age_and_zstd_clis(backed_up, tmp_path: Path) -> None:
    """Recovery without backupd, as the README shows: age -d -i key obj | zstd -d."""
    age_cli, zstd_cli = require_tool("age"), require_tool("zstd")
    job, backup_id = backed_up
    restored = tmp_path / "restored.sqlite3"
    run_backupd("restore", "shop", "--to", str(restored), config=job.config, check=True)
    decrypted = subprocess.run([age_cli, "-d", "-i", str(job.keys.identity_file), str(object_path(job, backup_id))],
                               capture_output=True, check=True).stdout
    plain = subprocess.run([zstd_cli, "-d", "-c"], input=decrypted, capture_output=True, check=True).stdout
    assert plain == restored.read_bytes()
    assert plain[:16] == b"SQLite format 3\0"
