"""PITR never stops silently at a gap in the WAL archive: restore refuses, names the segment, and --to-gap is explicit."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest

from backupd.timeutil import parse_timestamp
from pg_fixtures import JOB, PgEnv, pg_env  # noqa: F401  (fixture)

ARCHIVE_LOGS = True
METHOD = "physical"


@dataclass
class Gap:
    backup_id: str
    before: str  # a moment after phase "a" committed, before the gap
    after: str  # a moment after phase "c" committed, past the gap
    missing: str  # the segment removed from the archive


def _now(env: PgEnv) -> str:
    return env.sql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")[0][0]


@pytest.fixture(scope="module")
def gap(pg_env: PgEnv) -> Gap:
    env = pg_env
    env.sql("CREATE TABLE marks (id serial PRIMARY KEY, phase text NOT NULL)")
    env.sql("INSERT INTO marks (phase) SELECT 'base' FROM generate_series(1, 100)")
    backup_id = env.backupd("backup", JOB, check=True).out.strip()
    env.sql("INSERT INTO marks (phase) SELECT 'a' FROM generate_series(1, 10)")
    before = _now(env)
    env.switch_and_wait_archived()
    env.sql("INSERT INTO marks (phase) SELECT 'b' FROM generate_series(1, 10)")
    missing = env.switch_and_wait_archived()
    env.sql("INSERT INTO marks (phase) SELECT 'c' FROM generate_series(1, 10)")
    after = _now(env)
    env.switch_and_wait_archived()
    victim = env.repo / JOB / "wal" / missing[:8] / f"{missing}.zst.age"
    if not victim.exists():  # the folder layout may group segments
        victim = next((env.repo / JOB / "wal").rglob(f"{missing}.zst.age"))
    victim.unlink()
    return Gap(backup_id, before, after, missing)


def _phases(cluster) -> dict[str, int]:
    with cluster.connect("shop") as conn:
        return dict(conn.execute("SELECT phase, count(*) FROM marks GROUP BY phase").fetchall())


def test_restore_to_the_end_refuses_at_a_gap(pg_env: PgEnv, gap: Gap) -> None:
    target = pg_env.restored_cluster("to-end")
    result = pg_env.backupd("restore", JOB, "--to", str(target.data))
    assert result.code == 1, result.out + result.err
    assert gap.missing in result.err and "gap" in result.err
    assert "--to-gap" in result.err
    assert not target.data.exists()  # refused before anything was written


def test_dry_run_refuses_what_the_restore_would(pg_env: PgEnv, gap: Gap) -> None:
    target = pg_env.restored_cluster("dry")
    result = pg_env.backupd("restore", JOB, "--to", str(target.data), "--dry-run")
    assert result.code == 1 and gap.missing in result.err
    past = pg_env.backupd("restore", JOB, "--to", str(target.data), "--dry-run", f"--target-time={gap.after}")
    assert past.code == 1 and gap.missing in past.err
    within = pg_env.backupd("restore", JOB, "--to", str(target.data), "--dry-run", f"--target-time={gap.before}")
    assert within.code == 0, within.err


def test_a_target_past_the_gap_is_refused_not_dropped(pg_env: PgEnv, gap: Gap) -> None:
    target = pg_env.restored_cluster("past")
    result = pg_env.backupd("restore", JOB, "--to", str(target.data), f"--target-time={gap.after}")
    assert result.code == 1, result.out + result.err
    assert f"--target-time {gap.after}" in result.err and gap.missing in result.err
    assert not target.data.exists()


def test_a_target_before_the_gap_restores_exactly_its_rows(pg_env: PgEnv, gap: Gap) -> None:
    target = pg_env.restored_cluster("before")
    pg_env.backupd("restore", JOB, "--to", str(target.data), f"--target-time={gap.before}", check=True)
    pg_env.start_restored(target)
    assert _phases(target) == {"base": 100, "a": 10}


def test_to_gap_restores_up_to_the_gap_and_says_so(pg_env: PgEnv, gap: Gap) -> None:
    target = pg_env.restored_cluster("to-gap")
    result = pg_env.backupd("restore", JOB, "--to", str(target.data), "--to-gap", check=True)
    assert "--to-gap" in result.out and gap.missing in result.out
    pg_env.start_restored(target)
    assert _phases(target) == {"base": 100, "a": 10}


def test_list_ends_the_window_at_the_gap(pg_env: PgEnv, gap: Gap) -> None:
    listed = json.loads(pg_env.backupd("list", JOB, "--json", check=True).out)["backups"]
    window = next(b for b in listed if b["backup_id"] == gap.backup_id)["pitr"]
    assert window["broken_at"].endswith(gap.missing)
    assert parse_timestamp(window["to"]) < parse_timestamp(gap.after)
    assert parse_timestamp(window["from"]) <= parse_timestamp(window["to"])


def test_integrity_check_counts_the_gap(pg_env: PgEnv, gap: Gap) -> None:
    result = pg_env.backupd("verify", JOB, "--integrity-only", "--backup", gap.backup_id)
    assert result.code == 3 and gap.missing in result.out + result.err



def test_prune_dry_run_shows_the_window_ending_at_the_gap(pg_env: PgEnv, gap: Gap) -> None:
    config = pg_env.root / "prune.toml"
    config.write_text(pg_env.config.read_text() + "\n[jobs.pg.retention]\nkeep_last = 5\n")
    result = dataclasses.replace(pg_env, config=config).backupd("prune", JOB, "--dry-run", "--json", check=True)
    breaks = json.loads(result.out)["pitr_breaks"]
    assert any(gap.backup_id in line and gap.missing in line for line in breaks), breaks
