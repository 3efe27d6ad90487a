"""The file map as a stream of the backup: the manifest stays small, a host without the identity plans a
diff or incr from its own kept copy (checked against the manifest), else takes a full naming why, and a
map stream that does not match its manifest is refused by restore."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from backupd.manifest import Manifest
from drivers.postgres.cluster import chown_tree
from pg_fixtures import JOB, PgEnv, pg_env  # noqa: F401  (fixture)

ARCHIVE_LOGS = True
METHOD = "physical"


def manifest_of(env: PgEnv, backup_id: str) -> dict:
    return json.loads((env.repo / JOB / "backups" / backup_id / "manifest.json").read_text())


def kept(env: PgEnv, backup_id: str) -> Path:
    return env.state_dir / "filemaps" / JOB / f"{backup_id}.json"


def newest(env: PgEnv) -> str:
    return max(p.name for p in (env.repo / JOB / "backups").iterdir() if (p / "manifest.json").exists())


def backup(env: PgEnv, kind: str) -> tuple[str, str]:
    result = env.backupd("backup", JOB, "--type", kind, check=True, timeout=300)
    return result.out.strip(), result.err


@pytest.fixture(scope="module")
def full(pg_env: PgEnv) -> str:
    pg_env.sql("CREATE TABLE items (id int PRIMARY KEY, body text NOT NULL)")
    pg_env.sql("INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    return backup(pg_env, "full")[0]


@pytest.fixture
def keyless(pg_env: PgEnv):
    """The job's configuration without the identity file: a host that only backs up."""
    text = pg_env.config.read_text()
    line = next(line for line in text.splitlines() if line.startswith("identity_file"))
    config = pg_env.root / "backupd-keyless.toml"
    config.write_text(text.replace(line + "\n", ""))
    config.chmod(0o644)
    original, pg_env.config = pg_env.config, config
    try:
        yield pg_env
    finally:
        pg_env.config = original


def test_manifest_stays_small_and_the_map_is_kept_privately(pg_env: PgEnv, full: str) -> None:
    document = manifest_of(pg_env, full)
    raw = (pg_env.repo / JOB / "backups" / full / "manifest.json").stat().st_size
    assert "file_map" not in document["metadata"]
    facts = document["metadata"]["file_map_stream"]
    assert facts["files"] > 900 and facts["size"] > 100_000  # the map itself is large...
    assert raw < 4096 + 400 * len(document["objects"])  # ...the manifest is not
    path = kept(pg_env, full)
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_size == facts["size"]


def test_incr_without_identity_uses_the_kept_map_and_drops_maps_of_deleted_backups(keyless: PgEnv,
                                                                                   full: str) -> None:
    stale = kept(keyless, "20000101T000000Z")
    stale.write_text("{}")
    keyless.sql("UPDATE items SET body = 'changed' WHERE id <= 100")
    incr, err = backup(keyless, "incr")
    document = manifest_of(keyless, incr)
    assert document["metadata"]["type"] == "incr" and document["metadata"]["parent"] == full
    assert "instead of" not in err
    assert kept(keyless, incr).exists() and not stale.exists()


def test_without_the_kept_map_or_identity_a_full_is_taken_naming_why(keyless: PgEnv, full: str) -> None:
    parent = newest(keyless)
    kept(keyless, parent).unlink()
    taken, err = backup(keyless, "incr")
    assert manifest_of(keyless, taken)["metadata"]["type"] == "full"
    assert "taking a full backup instead of an incr" in err and f"{parent}.json" in err
    assert "identity_file" in err


def test_a_tampered_kept_map_is_not_used(pg_env: PgEnv, keyless: PgEnv, full: str) -> None:
    parent = newest(keyless)
    path = kept(keyless, parent)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    taken, err = backup(keyless, "incr")
    assert manifest_of(keyless, taken)["metadata"]["type"] == "full"
    assert "not matching its manifest" in err
    # with the identity, the parent's map is read from the repository instead
    data = bytearray(kept(keyless, taken).read_bytes())
    data[len(data) // 2] ^= 1
    kept(keyless, taken).write_bytes(bytes(data))
    keyless.config, original = Path(str(keyless.config).replace("backupd-keyless.toml", "backupd.toml")), \
        keyless.config
    try:
        incr, err = backup(keyless, "incr")
    finally:
        keyless.config = original
    document = manifest_of(keyless, incr)
    assert document["metadata"]["type"] == "incr" and document["metadata"]["parent"] == taken


def test_a_map_stream_not_matching_its_manifest_is_refused_by_restore(pg_env: PgEnv, full: str) -> None:
    forged_id = "20300101T000000Z"
    target_dir = pg_env.repo / JOB / "backups" / forged_id
    shutil.copytree(pg_env.repo / JOB / "backups" / full, target_dir)
    document = json.loads((target_dir / "manifest.json").read_text())
    document["backup_id"] = forged_id
    document["metadata"]["file_map_stream"]["sha256"] = "0" * 64
    (target_dir / "manifest.json").write_bytes(Manifest.from_dict(document).to_json())
    chown_tree(target_dir, "postgres")
    target = pg_env.root / "forged-map"
    try:
        result = pg_env.backupd("restore", JOB, "--to", str(target), "--backup", forged_id)
        assert result.code != 0, result.out
        assert f"backup {forged_id}: object data-filemap does not match the sha256" in result.err, result.err
        assert not target.exists() or not any(target.iterdir())
    finally:
        shutil.rmtree(target_dir)
