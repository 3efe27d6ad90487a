"""The per-job index (``<job>/index.json``, issue 22): rebuilt from the manifests when missing, corrupt or
stale; written with compare-and-swap; refused under trusted_keys unless a trusted key signed it; and the
commands that need one backup cost the same number of storage requests however many backups there are."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest

from backupd import context
from backupd.cli.main import main
from backupd.context import JobContext
from backupd.errors import ObjectChanged
from backupd.index import IndexedBackup
from backupd.manifest import Manifest
from backupd.repository import Repository
from backupd.settings import load_settings
from backupd.sshsig import SigningKey
from backupd.storage import Storage
from core_fixtures import SqliteJob, sqlite_job_config
from scale_support import scale, scale_storage
from support import run_backupd
from test_signed_backups import HOST_A, Signed, backup, forge, read, signed  # noqa: F401 (fixture)



def listed(config: Path) -> list[str]:
    return [b["backup_id"] for b in json.loads(run_backupd("list", "shop", "--json", config=config, check=True).out)
            ["backups"]]


def stored_index(root: Path) -> dict:
    return json.loads((root / "shop" / "index.json").read_text())["index"]


# ---- rebuilt when missing, unreadable or stale -------------------------------------------------

def test_index_is_written_by_commits_and_rebuilt_when_missing_or_corrupt(sqlite_job: SqliteJob) -> None:
    assert sqlite_job.repo_root is not None
    ids = [run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip() for _ in range(2)]
    index = stored_index(sqlite_job.repo_root)
    assert [b["backup_id"] for b in index["backups"]] == ids
    assert all(not b["pending"] and b["type"] == "full" and b["parent"] is None for b in index["backups"])
    assert listed(sqlite_job.config) == ids[::-1]

    (sqlite_job.repo_root / "shop" / "index.json").unlink()
    assert listed(sqlite_job.config) == ids[::-1]
    assert [b["backup_id"] for b in stored_index(sqlite_job.repo_root)["backups"]] == ids  # written back

    (sqlite_job.repo_root / "shop" / "index.json").write_text('{"index": [')
    result = run_backupd("list", "shop", "--json", config=sqlite_job.config, check=True)
    assert [b["backup_id"] for b in json.loads(result.out)["backups"]] == ids[::-1]
    assert "index unusable" in result.err
    assert [b["backup_id"] for b in stored_index(sqlite_job.repo_root)["backups"]] == ids


def test_a_stale_index_catches_up_with_the_manifests(sqlite_job: SqliteJob) -> None:
    assert sqlite_job.repo_root is not None
    ids = [run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip() for _ in range(3)]
    path = sqlite_job.repo_root / "shop" / "index.json"
    document = json.loads(path.read_text())
    older = json.loads(json.dumps(document))
    older["index"]["backups"] = older["index"]["backups"][:1]  # as before the last two commits (lost updates)
    path.write_text(json.dumps(older))
    assert listed(sqlite_job.config) == ids[::-1]  # committed past the index's newest: found by one listing

    # a commit killed between the manifest and the index update: the entry stays pending
    pending = json.loads(json.dumps(document))
    pending["index"]["backups"][1]["pending"] = True
    path.write_text(json.dumps(pending))
    assert listed(sqlite_job.config) == ids[::-1]  # its manifest exists: committed
    (sqlite_job.repo_root / "shop" / "backups" / ids[1] / "manifest.json").unlink()
    assert listed(sqlite_job.config) == [ids[2], ids[0]]  # no manifest: not a backup

    # a prune reconciles the index with the manifests it lists
    (sqlite_job.repo_root / "shop" / "backups" / ids[0] / "manifest.json").unlink()
    path.write_text(json.dumps(document))
    run_backupd("prune", "shop", config=sqlite_job.config, check=True)
    assert [b["backup_id"] for b in stored_index(sqlite_job.repo_root)["backups"]] == [ids[2]]


# ---- compare-and-swap --------------------------------------------------------------------------

def test_replace_is_a_compare_and_swap(storage: Storage) -> None:
    first = storage.replace("job/index.json", b"one", version=None)
    with pytest.raises(ObjectChanged):
        storage.replace("job/index.json", b"two", version=None)
    read_back = storage.read_versioned("job/index.json", 1 << 20)
    assert read_back.data == b"one" and read_back.version == first
    second = storage.replace("job/index.json", b"two", version=first)
    with pytest.raises(ObjectChanged):
        storage.replace("job/index.json", b"three", version=first)  # based on what is no longer there
    assert storage.read_versioned("job/index.json", 1 << 20).data == b"two"
    assert storage.read_versioned("job/index.json", 1 << 20).version == second
    storage.delete("job/index.json")
    with pytest.raises(ObjectChanged):
        storage.replace("job/index.json", b"four", version=second)


def test_two_writers_never_lose_each_others_entries(storage: Storage) -> None:
    def entry(number: int) -> IndexedBackup:
        manifest = Manifest.from_json(scale.manifest(number))
        return IndexedBackup.of(manifest, "unsigned", None)

    writers = [Repository(storage, "shop"), Repository(storage, "shop")]
    writers[0].update_index(lambda index: index.put(entry(0)))
    errors: list[BaseException] = []

    def write(writer: Repository, numbers: range) -> None:
        try:
            for number in numbers:
                writer.update_index(lambda index, n=number: index.put(entry(n)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w, range(1 + 6 * i, 7 + 6 * i))) for i, w in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stored = Repository(storage, "shop").index()
    assert sorted(b.backup_id for b in stored.backups) == sorted(scale.backup_id(n) for n in range(13))


# ---- a forged index under trusted_keys ---------------------------------------------------------

EVIL = SigningKey.generate("attacker")


@pytest.mark.parametrize("sign_with", [None, EVIL])
def test_a_forged_index_neither_hides_adds_nor_reorders_backups(signed: Signed, sign_with: SigningKey | None,  # noqa: F811
                                                               tmp_path: Path) -> None:
    older, newest = backup(signed), backup(signed)
    forged, _ = forge(signed, after=newest)
    stored = json.loads(read(signed.storage, "shop/index.json"))
    assert stored["signature"]  # signed by host A
    payload = stored["index"]
    entries = {b["backup_id"]: b for b in payload["backups"]}
    # hide the newest good backup's place: swap its times with the older one's, so keep_last = 1 deletes it;
    # and vouch for the forged one as if host A had signed it
    entries[older]["started_at"], entries[newest]["started_at"] = entries[newest]["started_at"], entries[older]["started_at"]
    fake = dict(entries[newest], backup_id=forged, started_at="2099-01-01T00:00:00Z", finished_at="2099-01-01T00:01:00Z")
    payload["backups"] = [entries[newest], entries[older], fake]
    from backupd import index as backup_index
    forged_document = backup_index.Index(
        "shop", [IndexedBackup.from_entry(b, "shop") for b in payload["backups"]])
    data = forged_document.to_bytes(sign_with)
    signed.storage.put("shop/index.json", io.BytesIO(data))

    listing = run_backupd("list", "shop", "--json", config=signed.config, check=True)
    shown = {b["backup_id"]: b["signature"] for b in json.loads(listing.out)["backups"]}
    assert shown == {forged: "unsigned", newest: "signed-by backupd@host-a", older: "signed-by backupd@host-a"}
    assert "index unusable" in listing.err

    planned = run_backupd("prune", "shop", "--dry-run", "--json", config=signed.config, check=True)
    actions = {d["name"]: d["action"] for d in json.loads(planned.out)["decisions"] if d["kind"] == "backup"}
    assert actions == {newest: "keep", older: "delete"}

    plan = run_backupd("restore", "shop", "--to", str(tmp_path / "r.sqlite3"), "--dry-run", config=signed.config,
                       check=True)
    assert newest in plan.out and forged not in plan.out

    run_backupd("prune", "shop", config=signed.config, check=True)
    assert listed(signed.config) == [forged, newest]
    rewritten = json.loads(read(signed.storage, "shop/index.json"))
    assert [b["backup_id"] for b in rewritten["index"]["backups"]] == [newest, forged]
    assert rewritten["index"]["backups"][1]["signature"] == "unsigned"


def test_a_manifest_swapped_under_a_signed_index_is_refused(signed: Signed, tmp_path: Path) -> None:  # noqa: F811
    first = backup(signed)
    second = backup(signed)
    # the attacker replaces the newest manifest with the older one's bytes under the newest's name
    body = json.loads(read(signed.storage, f"shop/backups/{first}/manifest.json"))
    body["backup_id"] = second
    signed.storage.put(f"shop/backups/{second}/manifest.json", io.BytesIO(Manifest.from_dict(body).to_json()))
    result = run_backupd("restore", "shop", "--to", str(tmp_path / "r.sqlite3"), "--dry-run", config=signed.config)
    assert second not in result.out.replace(f"{first}", "")  # never restored from the swapped manifest
    assert result.code == 0 and first in result.out


# ---- request counts do not grow with the repository ---------------------------------------------

def counted_run(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> int:
    counts: dict[str, int] = {}
    opened = context.open_storage
    monkeypatch.setattr(context, "open_storage", lambda s, n: scale.count_requests(opened(s, n), counts))
    assert main(["--log-level", "error", *argv]) == 0
    monkeypatch.setattr(context, "open_storage", opened)
    return scale.requests(counts)


@pytest.mark.parametrize("kind", ["filesystem", "s3"])
def test_per_backup_commands_cost_the_same_requests_at_any_size(kind: str, tmp_path: Path, keys, monkeypatch,
                                                                request: pytest.FixtureRequest) -> None:
    costs: dict[int, dict[str, int]] = {}
    for backups in (5, 60):
        work = tmp_path / str(backups)
        work.mkdir()
        table = scale_storage(kind, work, request, f"scale-{backups}", backups, 20)
        config = sqlite_job_config(work, keys, table, work / "db.sqlite3")
        ctx = JobContext(load_settings(config), "shop")
        assert len(ctx.repository.backup_ids()) == backups  # the first read builds the index
        ctx.close()
        middle = scale.backup_id(2)
        to = str(work / "restored.sqlite3")
        cfg = ["--config", str(config)]
        costs[backups] = {
            "show": counted_run(monkeypatch, [*cfg, "show", middle]),
            "restore --backup": counted_run(monkeypatch, [*cfg, "restore", "shop", "--to", to, "--dry-run",
                                                          "--backup", middle]),
            "restore --target-time": counted_run(monkeypatch, [*cfg, "restore", "shop", "--to", to, "--dry-run",
                                                               "--target-time", "2024-01-01T02:30:00Z"]),
            "verify --backup": counted_run(monkeypatch, [*cfg, "verify", "shop", "--integrity-only", "--backup",
                                                         middle]),
            "list": counted_run(monkeypatch, [*cfg, "list", "shop"]),
        }
    assert costs[5] == costs[60], costs
    assert costs[5]["show"] <= 2 and costs[5]["restore --backup"] <= 2, costs


def test_prune_dry_run_reads_nothing_per_backup_it_would_delete(tmp_path: Path, keys, monkeypatch) -> None:
    reads: dict[int, dict[str, int]] = {}
    for backups in (5, 80):
        work = tmp_path / str(backups)
        work.mkdir()
        scale.build_fs(work / "repo", backups, 30)
        config = sqlite_job_config(work, keys, {"type": "filesystem", "path": str(work / "repo")},
                                   work / "db.sqlite3", {"retention": {"keep_last": 2}})
        ctx = JobContext(load_settings(config), "shop")
        ctx.repository.backup_ids()  # the first read builds the index
        ctx.close()
        counts: dict[str, int] = {}
        opened = context.open_storage
        monkeypatch.setattr(context, "open_storage", lambda s, n: scale.count_requests(opened(s, n), counts))
        assert main(["--config", str(config), "--log-level", "error", "prune", "shop", "--dry-run"]) == 0
        monkeypatch.setattr(context, "open_storage", opened)
        reads[backups] = {k: v for k, v in counts.items() if k not in ("list", "list_after")}
    assert reads[5] == reads[80], reads  # GETs and HEADs: the index, pins, journal, run record; no per backup


def pitr_repository(root: Path, backups: int, wal: int, every: int) -> None:
    """``scale.build_fs``'s repository (WAL in the layout before folders), backup N recording that its logs
    begin with segment N * ``every``."""
    scale.build_fs(root, backups, wal, flat=True)
    for number in range(backups):
        path = root / "shop" / "backups" / scale.backup_id(number) / "manifest.json"
        document = json.loads(path.read_text())
        document["metadata"]["pitr"] = {"log_kind": "wal", "first_log": segment(number * every),
                                        "from": document["started_at"]}
        path.write_text(json.dumps(document, indent=2) + "\n")


def segment(number: int) -> str:
    return f"00000001{number >> 8:08X}{number & 0xFF:08X}"


def test_prune_lists_only_the_logs_it_can_delete(tmp_path: Path, keys, monkeypatch) -> None:  # noqa: F811
    """Backup N's logs begin at segment 50 N; keep_last 2 keeps backups 6 and 7, so segments 0-299 go. The
    listing of the archive stops past the folder (256 segments) holding segment 300, however many follow."""
    listed: dict[int, list[str]] = {}
    for wal in (600, 3000):
        work = tmp_path / str(wal)
        work.mkdir()
        pitr_repository(work / "repo", 8, wal, 50)
        config = sqlite_job_config(work, keys, {"type": "filesystem", "path": str(work / "repo")},
                                   work / "db.sqlite3", {"retention": {"keep_last": 2}})
        keys_read: list[str] = []
        opened = context.open_storage

        def counting(settings: object, name: str) -> Storage:
            storage = opened(settings, name)  # type: ignore[arg-type]
            plain = storage.list

            def listing(prefix: str):  # type: ignore[no-untyped-def]
                for info in plain(prefix):
                    keys_read.append(info.key)
                    yield info
            storage.list = listing  # type: ignore[method-assign]
            return storage

        monkeypatch.setattr(context, "open_storage", counting)
        assert main(["--config", str(config), "--log-level", "error", "prune", "shop"]) == 0
        monkeypatch.setattr(context, "open_storage", opened)
        listed[wal] = [key for key in keys_read if key.startswith("shop/wal/")]
        left = sorted(p.name for p in (work / "repo" / "shop" / "wal").iterdir())
        assert left[0] == f"{segment(300)}.zst.age" and left[-1] == f"{segment(wal - 1)}.zst.age"
        assert len(left) == wal - 300
        assert listed[wal] and all(key <= f"shop/wal/{segment(512)}.zst.age" for key in listed[wal])
    assert len(listed[600]) == len(listed[3000]) == 513, {k: len(v) for k, v in listed.items()}


def test_prune_dry_run_lists_no_log_when_none_can_go(tmp_path: Path, keys, monkeypatch) -> None:  # noqa: F811
    """No backup records where its logs begin: none can be deleted, so however many there are, none is listed."""
    costs: dict[int, int] = {}
    for wal in (30, 3000):
        work = tmp_path / str(wal)
        work.mkdir()
        scale.build_fs(work / "repo", 20, wal)
        config = sqlite_job_config(work, keys, {"type": "filesystem", "path": str(work / "repo")},
                                   work / "db.sqlite3", {"retention": {"keep_last": 2}})
        costs[wal] = counted_run(monkeypatch, ["--config", str(config), "prune", "shop", "--dry-run"])
    assert costs[30] == costs[3000], costs
