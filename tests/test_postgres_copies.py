"""A restored PostgreSQL copy never rewrites production's recovery history.

The copy gets archive_mode = off; a copy that archives anyway (--archive-mode preserve, an old backupd, a
hand-made archive_command) is refused by wal-push; and timelines already in the archive that forked off
production (promoted elsewhere) are flagged and never followed by a restore unless named.
"""

from __future__ import annotations

import json

from backupd.context import JobContext
from backupd.settings import load_settings
from pg_fixtures import JOB, PgEnv, pg_env  # noqa: F401  (fixture)

ARCHIVE_LOGS = True
METHOD = "physical"


def rows(cluster) -> list[str]:
    with cluster.connect("shop") as conn:
        return [row[0] for row in conn.execute("SELECT who FROM people ORDER BY id")]


def test_a_promoted_copy_leaves_production_restorable(pg_env: PgEnv) -> None:
    env = pg_env
    env.sql("CREATE TABLE people (id serial PRIMARY KEY, who text)")
    env.sql("INSERT INTO people (who) VALUES ('prod-1')")
    env.backupd("backup", JOB, check=True)
    env.sql("INSERT INTO people (who) VALUES ('prod-2')")
    env.switch_and_wait_archived()

    copy = env.restored_cluster("copy")
    out = env.backupd("restore", JOB, "--to", str(copy.data), check=True).out
    assert "archive_mode = off" in out
    auto = (copy.data / "postgresql.auto.conf").read_text()
    assert auto.rstrip().splitlines()[-1] == "archive_mode = off"
    copy.prepare_root()
    copy.configure({})  # another port and socket directory, as the hint says; archive_mode stays the restore's
    copy.start()
    copy.wait_promoted()
    with copy.connect("shop") as conn:
        conn.execute("INSERT INTO people (who) VALUES ('copy-only')")
        conn.execute("SELECT pg_switch_wal()")
    with copy.connect() as conn:
        assert conn.execute("SHOW archive_mode").fetchone()[0] == "off"

    # An old backupd's copy kept archiving: its timeline-2 WAL reached the archive. Put it there by hand.
    ctx = JobContext(load_settings(env.config), JOB)
    archive = ctx.log_archive("wal")
    pushed = 0
    for path in sorted((copy.data / "pg_wal").iterdir()):
        if path.name.startswith("00000002") and path.is_file():
            archive.push_file(f"00000002/{path.name}", path)
            pushed += 1
    ctx.close()
    assert pushed >= 2  # 00000002.history and timeline-2 segments

    # ... while production went on, on timeline 1.
    env.sql("INSERT INTO people (who) VALUES ('prod-3')")
    env.switch_and_wait_archived()

    listed = env.backupd("list", JOB, check=True).out
    assert "warning: job pg: timeline 2 starts at segment" in listed and "--target-timeline 2" in listed
    checked = env.backupd("check", JOB).out
    assert "WAL timelines: timeline 2" in checked

    again = env.restored_cluster("prod-again")
    plan = env.backupd("restore", JOB, "--to", str(again.data), "--dry-run", check=True).out
    assert "along timeline 1" in plan
    env.backupd("restore", JOB, "--to", str(again.data), check=True)
    env.start_restored(again)
    assert rows(again) == ["prod-1", "prod-2", "prod-3"]

    verified = json.loads(env.backupd("verify", JOB, "--integrity-only", "--json").out)
    assert any("timeline 2" in note for report in verified["reports"] for note in report["notes"])
