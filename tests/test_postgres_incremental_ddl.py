"""A PostgreSQL incr whose tables were created, emptied, dropped, renamed or rewritten since its parent:
the chain restores (and verifies) to exactly the tables and rows at the incr, with no file of a dropped or
rewritten relation left behind. The DDL happens before the incr, so no WAL replay can mend a wrong file set."""

from __future__ import annotations

from pathlib import Path

from pg_fixtures import JOB, PgEnv, pg_env  # noqa: F401  (fixture)

ARCHIVE_LOGS = True
METHOD = "physical"
TABLES = ("kept", "emptied", "dropped", "renamed", "rewritten")


def backup(env: PgEnv, kind: str) -> str:
    return env.backupd("backup", JOB, "--type", kind, check=True, timeout=300).out.strip()


def filepath(env: PgEnv, table: str) -> str:
    return env.sql(f"SELECT pg_relation_filepath('{table}')")[0][0]


def test_an_incr_after_ddl_restores_and_verifies_exactly(pg_env: PgEnv) -> None:
    env = pg_env
    for table in TABLES:
        env.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        env.sql(f"INSERT INTO {table} SELECT g, md5(g::text) FROM generate_series(1, 1000) g")
    env.sql("CHECKPOINT")
    backup(env, "full")
    gone = [filepath(env, "dropped"), filepath(env, "emptied"), filepath(env, "rewritten")]
    env.sql("CREATE TABLE added (id int PRIMARY KEY)")
    env.sql("INSERT INTO added VALUES (1), (2)")
    env.sql("TRUNCATE emptied")
    env.sql("INSERT INTO emptied VALUES (7, 'after')")
    env.sql("DROP TABLE dropped")
    env.sql("ALTER TABLE renamed RENAME TO moved")
    env.sql("VACUUM FULL rewritten")
    env.sql("CHECKPOINT")
    incr = backup(env, "incr")
    env.switch_and_wait_archived()

    verified = env.backupd("verify", JOB, "--backup", incr, timeout=300)
    assert verified.code == 0, verified.out + verified.err

    restored = env.restored_cluster("ddl")
    env.backupd("restore", JOB, "--to", str(restored.data), "--backup", incr, check=True, timeout=300)
    for relative in gone:
        assert not (Path(restored.data) / relative).exists(), relative
    env.start_restored(restored)
    try:
        with restored.connect("shop") as conn:
            names = sorted(row[0] for row in conn.execute(
                "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace"))
            assert set(names) >= {"added", "emptied", "kept", "moved", "rewritten"} and "dropped" not in names
            assert "renamed" not in names
            counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                      for t in ("added", "emptied", "kept", "moved", "rewritten")}
            assert counts == {"added": 2, "emptied": 1, "kept": 1000, "moved": 1000, "rewritten": 1000}
    finally:
        restored.stop()
