"""What of a data directory the file engine copies (a directory tree made by hand; no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backupd.errors import DriverError
from drivers.postgres.datadir import scan

VERSION = "PG_15_202209061"


def tree(root: Path, files: list[str]) -> None:
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 10)


def test_scan_copies_what_recovery_needs_and_leaves_out_the_rest(tmp_path: Path) -> None:
    data, space = tmp_path / "data", tmp_path / "space"
    tree(data, ["PG_VERSION", "global/pg_control", "base/1/1259", "base/1/16384", "base/1/16384_init",
                "base/1/16384_fsm", "base/1/16384.1", "base/1/16390_vm", "base/1/t3_16400", "base/1/pg_internal.init",
                "base/pgsql_tmp/pgsql_tmp1.0", "pg_wal/000000010000000000000001", "pg_wal/archive_status/x.ready",
                "pg_stat_tmp/global.stat", "pg_replslot/s/state", "postmaster.pid", "postmaster.opts",
                "backup_label.old", "pg_xact/0000", "pg_logical/replorigin_checkpoint"])
    tree(space, [f"{VERSION}/16385/16386", f"{VERSION}/16385/16387_init", f"{VERSION}/16385/16387",
                 "someone-else/file"])
    (data / "pg_tblspc").mkdir()
    (data / "pg_tblspc" / "16384").symlink_to(space)
    listing, spaces = scan(data, {"16384": "fast"}, VERSION)
    paths = sorted(f.path for f in listing.files)
    assert paths == ["PG_VERSION", "base/1/1259", "base/1/16384_init", "base/1/16390_vm", "global/pg_control",
                     "pg_logical/replorigin_checkpoint", f"pg_tblspc/16384/{VERSION}/16385/16386",
                     f"pg_tblspc/16384/{VERSION}/16385/16387_init", "pg_xact/0000"]
    assert {"pg_wal", "pg_wal/archive_status", "pg_stat_tmp", "pg_replslot", "pg_tblspc",
            f"pg_tblspc/16384/{VERSION}", f"pg_tblspc/16384/{VERSION}/16385"} <= set(listing.dirs)
    assert "base/pgsql_tmp" not in listing.dirs and "pg_replslot/s" not in listing.dirs
    assert [(s.oid, s.name, s.location) for s in spaces] == [("16384", "fast", str(space))]


def test_a_symlinked_directory_other_than_pg_wal_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tree(data, ["PG_VERSION", "global/pg_control"])
    (tmp_path / "elsewhere").mkdir()
    (data / "pg_wal").symlink_to(tmp_path / "elsewhere")  # a separate WAL disk is fine
    assert "pg_wal" in scan(data, {}, VERSION)[0].dirs
    (data / "pg_xact").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DriverError, match="symlinked directory"):
        scan(data, {}, VERSION)
