"""Faults on backupd's own files (state_dir full, a restore target that cannot be written): one line, exit 1."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from core_fixtures import SqliteJob
from support import error_lines, run_backupd


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``path`` (root only: CI runs as root)."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("these fault tests mount a tmpfs and need root")
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_state_dir_is_a_one_line_error(sqlite_job: SqliteJob) -> None:
    with tmpfs(sqlite_job.state_dir, "64k"):
        filler = sqlite_job.state_dir / "filler"
        with open(filler, "wb") as out, contextlib.suppress(OSError):
            out.write(b"\0" * (1 << 20))
        result = run_backupd("backup", "shop", config=sqlite_job.config)
    assert result.code == 1, result.err
    lines = error_lines(result.err)
    assert "internal error" not in result.err
    assert lines[0].startswith(f"backupd: error: {sqlite_job.state_dir}") and "No space left on device" in lines[0]
    assert any(line.startswith("hint: free space") for line in lines)


def test_a_restore_target_on_a_full_disk_is_a_one_line_error(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    run_backupd("backup", "shop", config=sqlite_job.config, check=True)
    with tmpfs(tmp_path / "small", "64k") as small:
        result = run_backupd("restore", "shop", "--to", str(small / "shop.sqlite3"), config=sqlite_job.config)
    assert result.code == 1, result.err
    assert "internal error" not in result.err
    line = error_lines(result.err)[0]
    assert str(small) in line and "No space left on device" in line
