"""`backupd verify --pitr-drill`: a restore to a random moment of the PITR window must start and answer queries."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from backupd.timeutil import parse_timestamp

from core_fixtures import Keys, SqliteJob
from mysql_support import Mariadb, started
from pg_fixtures import JOB, PgEnv, pg_env  # noqa: F401  (fixture: physical, archive_logs on)
from support import run_backupd
from test_mysql_driver import RunningArchiver, backup, make_job, tools  # noqa: F401  (fixture)

ARCHIVE_LOGS = True
METHOD = "physical"


def drill_step(out: str) -> dict[str, Any]:
    report = json.loads(out)["reports"][0]
    assert report["result"] == "passed", report["problems"]
    step = next(s for s in report["steps"] if s["step"] == "pitr drill")
    assert step["result"] == "passed"
    start, end = parse_timestamp(step["window_from"]), parse_timestamp(step["window_to"])
    assert start <= parse_timestamp(step["target_time"]) <= end
    return step


def test_postgres_pitr_drill(pg_env: PgEnv) -> None:  # noqa: F811
    env = pg_env
    env.sql("CREATE TABLE drill (id int PRIMARY KEY)")
    env.sql("INSERT INTO drill SELECT generate_series(1, 100)")
    env.backupd("backup", JOB, check=True)
    for batch in range(1, 4):
        time.sleep(0.3)
        env.sql("INSERT INTO drill SELECT generate_series(%s::int, %s::int)", (batch * 100 + 1, batch * 100 + 100))
    env.switch_and_wait_archived()
    result = env.backupd("verify", JOB, "--pitr-drill", "--json", as_postgres=False)
    assert result.code == 0, result.out + result.err
    step = drill_step(result.out)
    assert any(s["step"] == "accepts queries" for s in step["steps"])


def test_postgres_drill_after_the_newest_commit_replays_once(pg_env: PgEnv) -> None:  # noqa: F811
    """As `backupd restore` does: no target and one replay, not a failed replay and a second one."""
    import datetime as dt

    from backupd.context import JobContext
    from backupd.driver import RestoreTarget
    from backupd.restore import RepositorySource
    from backupd.settings import load_settings

    pg_env.sql("CREATE TABLE IF NOT EXISTS quiet (id int)")
    pg_env.sql("INSERT INTO quiet VALUES (1)")
    pg_env.backupd("backup", JOB, check=True)
    pg_env.switch_and_wait_archived()
    arrived = max(path.stat().st_mtime for path in (pg_env.repo / JOB / "wal").rglob("*.zst.age")
                  if ".history" not in path.name)
    moment = dt.datetime.fromtimestamp(arrived, dt.timezone.utc)
    ctx = JobContext(load_settings(pg_env.config), JOB)
    try:
        manifest = max((m for m in ctx.repository.manifests() if m.method == "physical"), key=lambda m: m.finished_at)
        source = RepositorySource(ctx.repository, manifest, ctx.identities, str(ctx.identity_file))
        scratch = pg_env.root / "drill-after-the-newest-commit"  # the postgres OS user reaches it
        scratch.mkdir()
        outcome = ctx.driver.pitr_drill(source, scratch, RestoreTarget("time", moment.isoformat(), moment))
    finally:
        ctx.close()
    recovery = next(step for step in outcome.steps if step["step"] == "recovery to target")
    assert recovery["note"].startswith("no commit after the target in the archived WAL: recovered to its end")
    assert "(newest commit " in recovery["note"]  # pg_waldump told, before the replay
    assert [check.ok for check in outcome.checks] == [True] * len(outcome.checks)


@pytest.fixture(scope="module")
def mysql_source() -> Iterator[Mariadb]:
    server = started(log_bin=True, server_id=31)
    try:
        yield server
    finally:
        server.destroy()


def test_mysql_pitr_drill(tools: None, mysql_source: Mariadb, tmp_path: Path, keys: Keys) -> None:  # noqa: F811
    source = mysql_source
    source.sql("CREATE DATABASE drill", "CREATE TABLE drill.t (id INT PRIMARY KEY)", "INSERT INTO drill.t VALUES (1)")
    job = make_job(tmp_path, keys, source, ["drill"], archive_logs=True, binlog_flush_interval="1s",
                   verify={"checks": ["SELECT count(*) > 0 FROM t"]})
    with RunningArchiver(job) as archiver:
        backup(job)
        for row in (2, 3):
            time.sleep(0.6)
            source.sql(f"INSERT INTO drill.t VALUES ({row})")
        archiver.wait_archived(source)
    result = run_backupd("verify", "shop", "--pitr-drill", "--json", config=job.config, timeout=300)
    assert result.code == 0, result.out + result.err
    step = drill_step(result.out)
    assert any(s["step"] == "replay binlogs" for s in step["steps"])


def test_pitr_drill_refused_for_a_driver_without_logs(sqlite_job: SqliteJob) -> None:
    run_backupd("backup", "shop", config=sqlite_job.config, check=True)
    result = run_backupd("verify", "shop", "--pitr-drill", config=sqlite_job.config)
    assert result.code == 2, result.out + result.err
    assert "driver sqlite has no PITR drill" in result.err
    both = run_backupd("verify", "shop", "--pitr-drill", "--integrity-only", config=sqlite_job.config)
    assert both.code == 2 and "not allowed with" in both.err
