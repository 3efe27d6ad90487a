"""A job that archives no WAL: the file engine copies the backup's own WAL from pg_wal into its base object,
so the backup restores and starts on its own; diff and incr carry theirs too."""

from __future__ import annotations

import json

from pg_fixtures import JOB, PgEnv, pg_env  # noqa: F401  (fixture)

ARCHIVE_LOGS = False
METHOD = "physical"


def test_backup_without_archive_restores_from_its_own_wal(pg_env: PgEnv) -> None:
    env = pg_env
    env.sql("CREATE TABLE t (id int PRIMARY KEY)")
    env.sql("INSERT INTO t SELECT generate_series(1, 5000)")
    full = env.backupd("backup", JOB, check=True).out.strip()
    env.sql("INSERT INTO t SELECT generate_series(5001, 5100)")
    incr = env.backupd("backup", JOB, "--type", "incr", check=True).out.strip()
    env.sql("INSERT INTO t SELECT generate_series(5101, 5200)")  # after the incr: not in it

    meta = json.loads(env.backupd("show", incr, "--json", check=True).out)["metadata"]
    assert meta["wal_method"] == "fetch" and meta["parent"] == full and "pitr" not in meta
    wal = [f["path"] for f in meta["file_map"]["files"] if f["path"].startswith("pg_wal/")]
    assert wal and meta["wal_range"]["last"].endswith(wal[-1].split("/")[1])

    restored = env.restored_cluster("nowal")
    out = env.backupd("restore", JOB, "--to", str(restored.data), check=True).out
    assert incr in out
    env.start_restored(restored)
    try:
        assert restored.connect("shop").execute("SELECT count(*), max(id) FROM t").fetchone() == (5100, 5100)
    finally:
        restored.stop()
    assert env.backupd("verify", JOB, timeout=300).code == 0
