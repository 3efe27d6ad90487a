"""PITR from the offsite repository alone: the cluster archives WAL into two repositories, the local
one is lost, and a restore by time from what offsite holds gives exactly the rows before the target."""

from __future__ import annotations

import hashlib
import shutil

from drivers.postgres.cluster import chown_tree
from pg_fixtures import JOB, PgEnv, pg_env  # noqa: F401  (fixture)

ARCHIVE_LOGS = True
METHOD = "physical"


def objects(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.zst.age")) if p.is_file()}


def test_pitr_by_time_from_offsite_alone_after_local_is_deleted(pg_env: PgEnv) -> None:
    env = pg_env
    offsite = env.root / "offsite"
    offsite.mkdir()
    chown_tree(offsite, "postgres")
    text = env.config.read_text().replace('storage = "main"', 'storage = ["main", "offsite"]')
    env.config.write_text(text + f'\n[storage.offsite]\ntype = "filesystem"\npath = "{offsite}"\n')
    env.switch_and_wait_archived()  # from here every segment goes to both

    env.sql("CREATE TABLE people (id serial PRIMARY KEY, who text NOT NULL)")
    env.sql("INSERT INTO people (who) SELECT 'before-' || n FROM generate_series(1, 200) AS n")
    backup_id = env.backupd("backup", JOB, check=True).out.strip()
    env.sql("INSERT INTO people (who) SELECT 'after-backup-' || n FROM generate_series(1, 50) AS n")
    moment = env.sql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")[0][0]
    env.sql("INSERT INTO people (who) SELECT 'after-target-' || n FROM generate_series(1, 30) AS n")
    env.switch_and_wait_archived()

    local_objects = objects(env.repo / JOB)
    offsite_objects = objects(offsite / JOB)
    assert f"backups/{backup_id}/base.zst.age" in offsite_objects
    assert local_objects == offsite_objects  # every object in each, the same bytes

    shutil.rmtree(env.repo)  # the local repository is gone
    restored = env.restored_cluster("from-offsite")
    result = env.backupd("restore", JOB, "--to", str(restored.data), f"--target-time={moment}")
    assert result.code == 0, result.err
    assert backup_id in result.out
    env.start_restored(restored)
    try:
        with restored.connect("shop") as conn:
            names = [row[0] for row in conn.execute("SELECT who FROM people ORDER BY id")]
    finally:
        restored.stop()
    assert names == [f"before-{n}" for n in range(1, 201)] + [f"after-backup-{n}" for n in range(1, 51)]
