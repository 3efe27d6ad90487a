"""``verify --integrity-only --backup ID`` lists only the WAL folders from the backup's first segment on, never
the whole archive: the same requests however many folders lie before it; a gap in its range still fails
it (exit 3), a whole folder missing included (issue 22)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterator

import pytest

from backupd import context
from backupd.cli.main import main
from backupd.repository import Repository
from backupd.settings import load_settings
from core_fixtures import Keys, keys  # noqa: F401
from support import write_config
from test_index import scale
from test_wal_layout import JOB, physical_manifest

BACKUP = "20261130T000000Z"


def segment(logid: int, number: int) -> str:
    return f"00000001{logid:08X}{number:08X}"


def archive(storage: Any, segments: list[str]) -> None:
    """WAL objects where the current layout keeps them (their contents do not matter to a listing)."""
    for name in segments:
        storage.put(f"{JOB}/wal/{name[:8]}/{name[:16]}/{name}.zst.age", io.BytesIO(b"w"))


def repository(tmp_path: Path, keys: Keys, table: dict[str, object], before: int,  # noqa: F811
               gap: str | None = None) -> Path:
    """Folders 0 .. ``before``-1 wholly archived (outside the backup's range); the backup starts in folder
    ``before`` at segment 0x80 and its WAL runs into the next folder. ``gap``: "segment" leaves one segment
    of its range out, "folder" the whole next folder (the archive goes on in the one after)."""
    (tmp_path / "pgdata").mkdir()
    config = write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": table,
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        f"jobs.{JOB}": {"driver": "postgres", "dsn": "postgresql://postgres@127.0.0.1:1/x", "storage": "main",
                        "method": "physical", "archive_logs": True, "data_dir": str(tmp_path / "pgdata")},
    })
    storage = context.open_storage(load_settings(config), "main")
    outside = [segment(logid, n) for logid in range(before) for n in range(0x100)]
    inside = [segment(before, n) for n in range(0x80, 0x100)]
    if gap == "segment":
        inside.remove(segment(before, 0x90))
    if gap == "folder":
        inside += [segment(before + 2, n) for n in range(0x10)]
    else:
        inside += [segment(before + 1, n) for n in range(0x10)]
    archive(storage, outside + inside)
    first = segment(before, 0x80)
    Repository(storage, JOB).commit(physical_manifest(BACKUP, f"{before:X}/80000028", f"00000001/{first}"))
    storage.close()
    return config


def verify(config: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, dict[str, int], list[str]]:
    """Exit code, requests (``bench/scale.py``'s count) and the prefixes listed under wal/."""
    counts: dict[str, int] = {}
    listed: list[str] = []
    opened = context.open_storage

    def counting(settings: Any, name: str) -> Any:
        storage = scale.count_requests(opened(settings, name), counts)
        plain_list, plain_after = storage.list, storage.list_after

        def listing(prefix: str) -> Iterator[Any]:
            listed.append(prefix)
            return plain_list(prefix)

        def after(prefix: str, start_after: str) -> Iterator[Any]:
            listed.append(f"{prefix} after {start_after[len(prefix):]}")
            return plain_after(prefix, start_after)

        storage.list, storage.list_after = listing, after
        return storage

    monkeypatch.setattr(context, "open_storage", counting)
    code = main(["--config", str(config), "--log-level", "error", "verify", JOB, "--integrity-only",
                 "--backup", BACKUP])
    monkeypatch.setattr(context, "open_storage", opened)
    return code, counts, [prefix for prefix in listed if "/wal/" in prefix]


@pytest.fixture(params=["filesystem", "s3"])
def table(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    def make(name: str) -> dict[str, object]:
        if request.param == "s3":
            endpoint = request.getfixturevalue("moto_server")
            import boto3

            bucket = f"verify-{name}-{abs(hash(str(tmp_path))) % 10**8}"
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
            return {"type": "s3", "bucket": bucket, "prefix": "prod/", "endpoint_url": endpoint, "region": "us-east-1"}
        (tmp_path / name / "repo").mkdir(parents=True)
        return {"type": "filesystem", "path": str(tmp_path / name / "repo")}
    yield make


def test_verify_of_one_backup_lists_only_the_folders_its_range_needs(tmp_path: Path, keys: Keys,  # noqa: F811
                                                                     table: Any, monkeypatch) -> None:
    costs = {}
    for before in (1, 5):
        work = tmp_path / f"before-{before}"
        work.mkdir()
        code, counts, listed = verify(repository(work, keys, table(f"b{before}"), before), monkeypatch)
        assert code == 0
        folder = f"{before:08X}"
        assert listed == [f"{JOB}/wal/00000001/00000001{folder}", f"{JOB}/wal/00000001/00000001{before + 1:08X}",
                          f"{JOB}/wal/00000001/00000001{before + 2:08X}",
                          f"{JOB}/wal/00000001/ after 00000001{before + 2:08X}/\U0010ffff"]
        costs[before] = scale.requests(counts)
    assert costs[1] == costs[5], costs


@pytest.mark.parametrize("gap", ["segment", "folder"])
def test_a_gap_in_the_range_of_the_backup_still_fails_it(tmp_path: Path, keys: Keys, table: Any,  # noqa: F811
                                                         monkeypatch, capsys: pytest.CaptureFixture[str],
                                                         gap: str) -> None:
    code, _, listed = verify(repository(tmp_path, keys, table("gap"), 2, gap), monkeypatch)
    assert code == 3
    missing = segment(2, 0x90) if gap == "segment" else segment(3, 0x00)
    assert f"log archive gap: missing WAL segment 00000001/{missing}" in capsys.readouterr().out
    assert f"{JOB}/wal/00000001/0000000100000000" not in listed  # never the folders before its start
