"""A cluster with two tablespaces round-trips through the file engine; --tablespace-map relocates one."""

from __future__ import annotations

import json

from pg_fixtures import JOB, PgEnv, pg_env  # noqa: F401  (fixture)
from drivers.postgres.cluster import chown_tree

ARCHIVE_LOGS = True
METHOD = "physical"


def test_two_tablespaces_round_trip_one_relocated(pg_env: PgEnv) -> None:
    env = pg_env
    for name in ("ts_fast", "ts_slow"):
        (env.root / name).mkdir(mode=0o700)
    chown_tree(env.root / "ts_fast", "postgres")
    chown_tree(env.root / "ts_slow", "postgres")
    env.sql(f"CREATE TABLESPACE ts_fast LOCATION '{env.root / 'ts_fast'}'")
    env.sql(f"CREATE TABLESPACE ts_slow LOCATION '{env.root / 'ts_slow'}'")
    env.sql("CREATE TABLE hot (id int PRIMARY KEY) TABLESPACE ts_fast")
    env.sql("INSERT INTO hot SELECT generate_series(1, 3000)")
    env.sql("CREATE TABLE cold (id int, note text) TABLESPACE ts_slow")
    env.sql("INSERT INTO cold SELECT g, 'cold' FROM generate_series(1, 5000) g")
    env.sql("CREATE INDEX cold_id ON cold (id) TABLESPACE ts_fast")
    backup_id = env.backupd("backup", JOB, check=True).out.strip()
    env.switch_and_wait_archived()

    meta = json.loads(env.backupd("show", backup_id, "--json", check=True).out)["metadata"]
    spaces = {space["name"]: space["location"] for space in meta["tablespaces"]}
    assert spaces == {"ts_fast": str(env.root / "ts_fast"), "ts_slow": str(env.root / "ts_slow")}
    assert any(f["path"].startswith("pg_tblspc/") for f in meta["file_map"]["files"])
    verified = env.backupd("verify", JOB, "--backup", backup_id, timeout=300)  # tablespaces inside the scratch
    assert verified.code == 0, verified.err

    # The originals are in use: restoring into them is refused before anything is written.
    target = env.restored_cluster("spaces")
    refused = env.backupd("restore", JOB, "--to", str(target.data))
    assert refused.code == 2 and "is not empty" in refused.err and "--tablespace-map" in refused.err
    assert not target.data.exists()

    # The primary is lost with its slow disk; ts_fast goes somewhere new, ts_slow back where it was.
    env.cluster.stop()
    (env.root / "ts_slow").rename(env.root / "ts_slow.lost")
    relocated = env.root / "new-fast"
    plan = env.backupd("restore", JOB, "--to", str(target.data), "--tablespace-map", f"ts_fast={relocated}",
                       "--dry-run", check=True).out
    assert f"-> {relocated}" in plan and f"ts_slow (oid " in plan and not relocated.exists()
    out = env.backupd("restore", JOB, "--to", str(target.data), "--tablespace-map", f"ts_fast={relocated}",
                      check=True).out
    assert backup_id in out
    assert (target.data / "pg_tblspc").is_dir()
    env.start_restored(target)
    try:
        with target.connect("shop") as conn:
            assert conn.execute("SELECT count(*) FROM hot").fetchone()[0] == 3000
            assert conn.execute("SELECT count(*), min(note) FROM cold WHERE id > 0").fetchone() == (5000, "cold")
            assert conn.execute("SELECT count(*) FROM cold WHERE id = 4321").fetchone()[0] == 1
            locations = dict(conn.execute("SELECT spcname, pg_tablespace_location(oid) FROM pg_tablespace "
                                          "WHERE spcname LIKE 'ts_%'").fetchall())
        assert locations == {"ts_fast": str(relocated), "ts_slow": str(env.root / "ts_slow")}
    finally:
        target.stop()
