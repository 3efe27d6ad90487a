"""A physical restore writes into a work directory that becomes --to only on success."""

from __future__ import annotations

from pathlib import Path

import pytest

from backupd.errors import DriverError
from drivers.postgres.physical import staged_directory


def fill(work: Path) -> None:
    (work / "PG_VERSION").write_text("15\n")
    (work / "base").mkdir()
    (work / "base" / "1").write_text("x")


@pytest.mark.parametrize("existing", [None, "empty", "full"])
def test_success_replaces_the_target(tmp_path: Path, existing: str | None) -> None:
    dest = tmp_path / "restore" / "data"
    if existing:
        dest.mkdir(parents=True)
        if existing == "full":
            (dest / "old-file").write_text("old")
            (dest / "old-dir").mkdir()
    with staged_directory(dest, force=existing == "full") as work:
        assert work != dest and not (dest / "PG_VERSION").exists()
        fill(work)
    assert sorted(p.name for p in dest.iterdir()) == ["PG_VERSION", "base"]
    assert (dest / "base" / "1").read_text() == "x"
    assert oct(dest.stat().st_mode & 0o777) == "0o700"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["data"]


@pytest.mark.parametrize("existing", [None, "empty", "full"])
def test_failure_leaves_nothing_that_looks_like_a_data_directory(tmp_path: Path, existing: str | None) -> None:
    dest = tmp_path / "restore" / "data"
    if existing:
        dest.mkdir(parents=True)
        if existing == "full":
            (dest / "old-file").write_text("old")
    with pytest.raises(RuntimeError), staged_directory(dest, force=True) as work:
        fill(work)
        raise RuntimeError("the stream broke")
    if existing is None:
        assert not dest.exists() and list(dest.parent.iterdir()) == []
    else:
        assert [p.name for p in dest.iterdir()] == (["old-file"] if existing == "full" else [])


def test_refusals_come_before_any_write(tmp_path: Path) -> None:
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "postmaster.pid").write_text("1\n")
    with pytest.raises(DriverError, match="postmaster.pid exists"), staged_directory(dest, force=True):
        pass
    (dest / "postmaster.pid").unlink()
    (dest / "keep").write_text("k")
    with pytest.raises(DriverError, match="not empty"), staged_directory(dest, force=False):
        pass
    assert [p.name for p in dest.iterdir()] == ["keep"]
