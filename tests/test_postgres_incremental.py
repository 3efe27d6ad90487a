"""Diff and incr backups by the file engine: full, 1% of a table updated, diff, another 1%, incr; the incr
stores a small fraction of the full, PITR from the incr chain gives exactly the marker rows, and retention
keeps or expires a chain as a whole."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from pg_fixtures import JOB, PgEnv, pg_env  # noqa: F401  (fixture)

ARCHIVE_LOGS = True
METHOD = "physical"
ROWS = 200_000


@dataclass
class Chain:
    full: str
    diff: str
    incr: str
    targets: dict[str, list[str]]


def backup(env: PgEnv, kind: str) -> str:
    return env.backupd("backup", JOB, "--type", kind, check=True, timeout=300).out.strip()


def shown(env: PgEnv, backup_id: str) -> dict:
    return json.loads(env.backupd("show", backup_id, "--json", check=True).out)


def marks(cluster) -> list[str]:
    with cluster.connect("shop") as conn:
        return sorted({row[0] for row in conn.execute("SELECT phase FROM marks")})


@pytest.fixture(scope="module")
def chain(pg_env: PgEnv) -> Chain:
    env = pg_env
    env.sql("CREATE TABLE big (id int PRIMARY KEY, payload text NOT NULL)")
    env.sql(f"INSERT INTO big SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, {ROWS}) g")
    env.sql("CREATE TABLE marks (id serial PRIMARY KEY, phase text NOT NULL)")
    env.sql("VACUUM FREEZE big")  # hint bits and visibility set now, not by the first reads after the full
    env.sql("CHECKPOINT")
    full = backup(env, "full")
    # updates keep the row's size, as most do: new versions go to the table's end, not into every page's slack
    env.sql(f"UPDATE big SET payload = 'changed-a' || repeat(md5(id::text), 3)::char(87) WHERE id <= {ROWS // 100}")
    env.sql("INSERT INTO marks (phase) VALUES ('diff')")
    diff = backup(env, "diff")
    env.sql(f"UPDATE big SET payload = 'changed-b' || repeat(md5(id::text), 3)::char(87) "
            f"WHERE id > {ROWS // 2} AND id <= {ROWS // 2 + ROWS // 100}")
    env.sql("INSERT INTO marks (phase) VALUES ('incr')")
    incr = backup(env, "incr")

    targets: dict[str, list[str]] = {}
    env.sql("INSERT INTO marks (phase) VALUES ('time')")
    moment = env.sql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")[0][0]
    targets[f"--target-time={moment}"] = ["diff", "incr", "time"]
    env.sql("INSERT INTO marks (phase) VALUES ('after-time')")
    env.sql("INSERT INTO marks (phase) VALUES ('lsn')")
    lsn = env.sql("SELECT pg_current_wal_lsn()::text")[0][0]
    targets[f"--target-lsn={lsn}"] = ["after-time", "diff", "incr", "lsn", "time"]
    env.sql("INSERT INTO marks (phase) VALUES ('name')")
    env.sql("SELECT pg_create_restore_point('incr-chain')")
    targets["--target-name=incr-chain"] = ["after-time", "diff", "incr", "lsn", "name", "time"]
    env.sql("INSERT INTO marks (phase) VALUES ('after-name')")
    env.switch_and_wait_archived()
    return Chain(full, diff, incr, targets)


def test_manifests_name_types_parents_and_references(pg_env: PgEnv, chain: Chain) -> None:
    full, diff, incr = (shown(pg_env, b) for b in (chain.full, chain.diff, chain.incr))
    assert [m["metadata"]["type"] for m in (full, diff, incr)] == ["full", "diff", "incr"]
    assert diff["metadata"]["parent"] == chain.full and incr["metadata"]["parent"] == chain.diff
    holders = {part[0] for entry in incr["metadata"]["file_map"]["files"] for part in entry["parts"]}
    assert all(len(entry["hashes"]) % 16 == 0 for entry in incr["metadata"]["file_map"]["files"])
    assert {chain.full, chain.diff, None} <= holders  # unchanged files and chunks stay where they were
    blocks = [entry for entry in incr["metadata"]["file_map"]["files"]
              if any(part[2].endswith(".blocks") for part in entry["parts"])]
    assert blocks, "the updated table is stored by its changed chunks"
    listed = pg_env.backupd("list", JOB, "--json", check=True).out
    rows = {b["backup_id"]: b for b in json.loads(listed)["backups"]}
    assert rows[chain.incr]["type"] == "incr" and rows[chain.incr]["parent"] == chain.diff


def test_incr_and_diff_store_a_small_fraction_of_the_full(pg_env: PgEnv, chain: Chain) -> None:
    full, diff, incr = (shown(pg_env, b) for b in (chain.full, chain.diff, chain.incr))
    assert incr["stored_size"] < 0.10 * full["stored_size"], (incr["stored_size"], full["stored_size"])
    assert diff["stored_size"] < 0.10 * full["stored_size"], (diff["stored_size"], full["stored_size"])


@pytest.mark.parametrize("kind", ["time", "lsn", "name"])
def test_pitr_from_the_incr_chain(pg_env: PgEnv, chain: Chain, kind: str) -> None:
    arg, expected = next((a, e) for a, e in chain.targets.items() if a.startswith(f"--target-{kind}="))
    restored = pg_env.restored_cluster(f"incr-{kind}")
    out = pg_env.backupd("restore", JOB, "--to", str(restored.data), arg, check=True).out
    assert chain.incr in out
    pg_env.start_restored(restored)
    try:
        assert marks(restored) == expected
        with restored.connect("shop") as conn:
            changed = dict(conn.execute("SELECT left(payload, 9), count(*) FROM big WHERE payload LIKE 'changed-%' "
                                        "GROUP BY 1").fetchall())
            assert changed == {"changed-a": ROWS // 100, "changed-b": ROWS // 100}
            assert conn.execute("SELECT count(*), sum(id) FROM big").fetchone() == (ROWS, ROWS * (ROWS + 1) // 2)
    finally:
        restored.stop()


def test_restore_of_the_diff_alone(pg_env: PgEnv, chain: Chain) -> None:
    restored = pg_env.restored_cluster("diff")
    out = pg_env.backupd("restore", JOB, "--to", str(restored.data), "--backup", chain.diff, check=True).out
    assert chain.diff in out
    pg_env.start_restored(restored)
    try:
        # no target: replay to the end of the archive, from the diff's chain (full + diff)
        assert "after-name" in marks(restored)
    finally:
        restored.stop()


def test_delta_restore_of_the_incr_over_a_restored_full(pg_env: PgEnv, chain: Chain) -> None:
    restored = pg_env.restored_cluster("delta-chain")
    pg_env.backupd("restore", JOB, "--to", str(restored.data), "--backup", chain.full, check=True)
    out = pg_env.backupd("restore", JOB, "--to", str(restored.data), "--backup", chain.incr, "--delta",
                         "--target-name=incr-chain", check=True).out
    rewritten = int(out.split("delta: ")[1].split(" files rewritten")[0])
    assert 0 < rewritten < len(shown(pg_env, chain.incr)["metadata"]["file_map"]["files"]) / 4
    pg_env.start_restored(restored)
    try:
        assert marks(restored) == chain.targets["--target-name=incr-chain"]
    finally:
        restored.stop()


def test_verify_restores_the_chain(pg_env: PgEnv, chain: Chain) -> None:
    result = pg_env.backupd("verify", JOB, "--backup", chain.incr, timeout=300)
    assert result.code == 0, result.err


def test_retention_keeps_and_expires_chains_whole(pg_env: PgEnv, chain: Chain) -> None:
    env = pg_env
    text = env.config.read_text().replace(f"[jobs.{JOB}]\n", f"[jobs.{JOB}]\nretention = {{ keep_last = 1 }}\n")
    config = env.root / "backupd-retention.toml"
    config.write_text(text)
    config.chmod(0o644)
    original = env.config
    env.config = config
    try:
        plan = env.backupd("prune", JOB, "--dry-run", check=True).out
        assert f"parent of {chain.incr}" in plan and f"parent of {chain.diff}" in plan
        env.backupd("prune", JOB, check=True)
        kept = {b["backup_id"] for b in json.loads(env.backupd("list", JOB, "--json", check=True).out)["backups"]}
        assert {chain.full, chain.diff, chain.incr} <= kept
        newer = backup(env, "full")
        env.backupd("prune", JOB, check=True)
        listed = json.loads(env.backupd("list", JOB, "--json", check=True).out)["backups"]
        assert [b["backup_id"] for b in listed] == [newer]
        assert env.backupd("verify", JOB, "--integrity-only").code == 0
    finally:
        env.config = original
