"""The physical file engine through the real CLI: bundled tar objects readable with age | zstd | tar, a
chunk map in the manifest, parallel restore, and --delta over an existing data directory."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from drivers.postgres.cluster import chown_tree
from pg_fixtures import JOB, PgEnv, pg_env  # noqa: F401  (fixture)

ARCHIVE_LOGS = True
METHOD = "physical"


@pytest.fixture(scope="module")
def full(pg_env: PgEnv) -> str:
    env = pg_env
    env.sql("CREATE TABLE items (id int PRIMARY KEY, body text NOT NULL)")
    env.sql("INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    env.sql("CREATE UNLOGGED TABLE scratch (id int)")
    env.sql("INSERT INTO scratch SELECT generate_series(1, 1000)")
    backup_id = env.backupd("backup", JOB, check=True).out.strip()
    env.switch_and_wait_archived()
    return backup_id


def shown(env: PgEnv, backup_id: str) -> dict:
    return json.loads(env.backupd("show", backup_id, "--json", check=True).out)


def test_full_backup_is_bundled_and_mapped(pg_env: PgEnv, full: str) -> None:
    manifest = shown(pg_env, full)
    meta = manifest["metadata"]
    assert meta["engine"] == "files" and meta["process_max"] == (os.cpu_count() or 1)
    names = [obj["name"] for obj in manifest["objects"]]
    assert names[0] == "base" and all(name.startswith("data-") for name in names[1:])
    paths = {entry["path"] for entry in meta["file_map"]["files"]}
    assert {"global/pg_control", "backup_label", "PG_VERSION", "postgresql.conf"} <= paths
    assert len(names) < len(paths) / 20  # small files are bundled, not one object each
    assert not any(p.startswith("pg_wal/") or p == "postmaster.pid" for p in paths)
    scratch = pg_env.sql("SELECT pg_relation_filepath('scratch')")[0][0]
    assert scratch not in paths and f"{scratch}_init" in paths  # unlogged: only the init fork
    assert "pg_wal" in meta["file_map"]["dirs"]
    assert meta["stop_lsn"] and meta["wal_range"]["first"] == meta["pitr"]["first_log"]
    human = pg_env.backupd("show", full, check=True).out
    assert f"file_map.files  {len(paths)} entries (`show --json` lists them)" in human


def age_zstd_tar(identity: Path, obj: Path, *tar_args: str) -> str:
    """``age -d -i IDENTITY OBJ | zstd -dq | tar TAR_ARGS``, as argv lists (no shell)."""
    age = subprocess.Popen(["age", "-d", "-i", str(identity), str(obj)], stdout=subprocess.PIPE)
    zstd = subprocess.Popen(["zstd", "-dq"], stdin=age.stdout, stdout=subprocess.PIPE)
    assert age.stdout is not None and zstd.stdout is not None
    age.stdout.close()
    tar = subprocess.run(["tar", *tar_args], stdin=zstd.stdout, capture_output=True, text=True, check=True)
    zstd.stdout.close()
    assert (age.wait(), zstd.wait()) == (0, 0)
    return tar.stdout


def test_objects_open_with_age_zstd_tar(pg_env: PgEnv, full: str) -> None:
    obj = pg_env.repo / JOB / "backups" / full / "base.zst.age"
    listing = age_zstd_tar(pg_env.identity, obj, "-t").split()
    assert listing == ["global/pg_control", "backup_label"]
    label = age_zstd_tar(pg_env.identity, obj, "-xO", "backup_label")
    assert f"LABEL: backupd {JOB}" in label and "START WAL LOCATION" in label


def corrupt(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(8192 + 100)
        handle.write(b"\xde\xad\xbe\xef" * 64)


def test_delta_restore_repairs_a_corrupted_file_and_removes_an_extra_one(pg_env: PgEnv, full: str) -> None:
    env = pg_env
    restored = env.restored_cluster("delta")
    env.backupd("restore", JOB, "--to", str(restored.data), "--backup", full, check=True)
    env.start_restored(restored)
    assert restored.connect("shop").execute("SELECT count(*) FROM items").fetchone()[0] == 20000
    relation = restored.connect("shop").execute("SELECT pg_relation_filepath('items')").fetchone()[0]
    restored.stop()
    corrupt(restored.data / relation)
    (restored.data / "base" / "extra-file").write_text("not from the backup")
    (restored.data / "stray").mkdir()

    refused = env.backupd("restore", JOB, "--to", str(restored.data), "--backup", full)
    assert refused.code != 0 and "not empty" in refused.err
    result = env.backupd("restore", JOB, "--to", str(restored.data), "--backup", full, "--delta", check=True)
    assert "delta:" in result.out
    rewritten = int(result.out.split("delta: ")[1].split(" files rewritten")[0])
    files = len(shown(env, full)["metadata"]["file_map"]["files"])
    assert 1 <= rewritten < files / 4
    assert not (restored.data / "base" / "extra-file").exists() and not (restored.data / "stray").exists()
    env.start_restored(restored)
    try:
        with restored.connect("shop") as conn:
            assert conn.execute("SELECT count(*), sum(id) FROM items").fetchone() == (20000, sum(range(1, 20001)))
            conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
            conn.execute("SELECT bt_index_check('items_pkey', true)")
            assert conn.execute("SELECT count(*) FROM verify_heapam('items')").fetchone()[0] == 0
    finally:
        restored.stop()


def test_delta_refuses_a_running_cluster(pg_env: PgEnv, full: str) -> None:
    result = pg_env.backupd("restore", JOB, "--to", str(pg_env.cluster.data), "--backup", full, "--delta")
    assert result.code != 0 and "postmaster.pid" in result.err
    assert pg_env.sql("SELECT count(*) FROM items") == [(20000,)]


def test_tablespace_map_of_an_unknown_name_is_refused(pg_env: PgEnv, full: str) -> None:
    target = pg_env.root / "never"
    result = pg_env.backupd("restore", JOB, "--to", str(target), "--backup", full,
                            "--tablespace-map", f"nope={pg_env.root / 'x'}")
    assert result.code == 2 and "has no tablespace nope" in result.err
    assert not target.exists()


def test_check_names_the_physical_engine(pg_env: PgEnv, full: str) -> None:
    out = pg_env.backupd("check", JOB).out
    line = next(line for line in out.splitlines() if "physical engine" in line)
    assert "file engine: reads" in line and str(pg_env.cluster.data) in line, out
    remote = pg_env.root / "backupd-remote.toml"
    remote.write_text(pg_env.config.read_text().replace(f'data_dir = "{pg_env.cluster.data}"\n', ""))
    remote.chmod(0o644)
    original, pg_env.config = pg_env.config, remote
    try:
        out = pg_env.backupd("check", JOB).out
        assert "pg_basebackup (full backups only): no data_dir is configured" in out, out
        refused = pg_env.backupd("backup", JOB, "--type", "incr")
        assert refused.code == 2 and "needs the file engine" in refused.err
    finally:
        pg_env.config = original


def test_a_map_naming_an_object_outside_the_chain_is_refused_before_writing(pg_env: PgEnv, full: str) -> None:
    import shutil

    from backupd.manifest import Manifest

    source = pg_env.repo / JOB / "backups" / full
    forged_id = "20300101T000000Z"
    target_dir = pg_env.repo / JOB / "backups" / forged_id
    shutil.copytree(source, target_dir)
    document = json.loads((target_dir / "manifest.json").read_text())
    document["backup_id"] = forged_id
    # forged in a map the manifest carries itself, as backups taken before the map stream do
    document["metadata"]["file_map"] = shown(pg_env, full)["metadata"]["file_map"]
    del document["metadata"]["file_map_stream"]
    document["metadata"]["file_map"]["files"][0]["parts"][0][0] = "20000101T000000Z"
    (target_dir / "manifest.json").write_bytes(Manifest.from_dict(document).to_json())
    chown_tree(target_dir, "postgres")
    target = pg_env.root / "forged"
    try:
        for extra in ([], ["--delta"]):
            result = pg_env.backupd("restore", JOB, "--to", str(target), "--backup", forged_id, *extra)
            assert result.code != 0 and "which its chain does not have" in result.err, result.err
            assert not target.exists() or not any(target.iterdir())
    finally:
        shutil.rmtree(target_dir)
