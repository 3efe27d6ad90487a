"""PostgreSQL physical backups and point-in-time restores through the real CLI (pgBackRest-style scenarios)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from pg_fixtures import JOB, PgEnv, pg_env  # noqa: F401  (fixture)
from support import run_backupd

ARCHIVE_LOGS = True
METHOD = "physical"


@dataclass
class Scenario:
    backup_id: str
    targets: dict[str, list[str]]  # restore args -> phases expected


def phases(env: PgEnv, cluster=None) -> list[str]:
    with (cluster or env.cluster).connect("shop") as conn:
        return sorted({row[0] for row in conn.execute("SELECT phase FROM marks")})


@pytest.fixture(scope="module")
def scenario(pg_env: PgEnv) -> Scenario:
    env = pg_env
    env.sql("CREATE TABLE marks (id serial PRIMARY KEY, phase text NOT NULL)")
    env.sql("INSERT INTO marks (phase) SELECT 'base' FROM generate_series(1, 500)")
    backup_id = env.backupd("backup", JOB, check=True).out.strip()

    def insert(phase: str) -> None:
        env.sql("INSERT INTO marks (phase) SELECT %s FROM generate_series(1, 10)", (phase,))

    targets: dict[str, list[str]] = {}
    insert("time")
    moment = env.sql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")[0][0]
    targets[f"--target-time={moment}"] = ["base", "time"]
    insert("after-time")
    insert("lsn")
    lsn = env.sql("SELECT pg_current_wal_lsn()::text")[0][0]
    targets[f"--target-lsn={lsn}"] = ["after-time", "base", "lsn", "time"]
    insert("after-lsn")
    insert("name")
    env.sql("SELECT pg_create_restore_point('before-drop')")
    targets["--target-name=before-drop"] = ["after-lsn", "after-time", "base", "lsn", "name", "time"]
    insert("after-name")
    with env.connect() as conn:
        with conn.transaction():
            conn.execute("INSERT INTO marks (phase) SELECT 'xid' FROM generate_series(1, 10)")
            xid = conn.execute("SELECT txid_current()").fetchone()[0]
    targets[f"--target-xid={xid}"] = ["after-lsn", "after-name", "after-time", "base", "lsn", "name", "time", "xid"]
    env.sql("DROP TABLE marks")
    env.switch_and_wait_archived()
    return Scenario(backup_id, targets)


def test_manifest_records_backup_points(pg_env: PgEnv, scenario: Scenario) -> None:
    shown = json.loads(pg_env.backupd("show", scenario.backup_id, "--json", check=True).out)
    meta = shown["metadata"]
    assert meta["timeline"] == 1 and meta["backup_from"] == "primary"
    assert meta["start_lsn"] and meta["stop_lsn"] and meta["label"] == f"backupd {JOB}"
    assert meta["pitr"]["log_kind"] == "wal"
    assert meta["pitr"]["first_log"] == meta["wal_range"]["first"]
    assert meta["pitr"]["first_log"].startswith("00000001/00000001")
    assert shown["objects"][0]["name"] == "base"


@pytest.mark.parametrize("kind", ["time", "lsn", "name", "xid"])
def test_point_in_time_restore(pg_env: PgEnv, scenario: Scenario, kind: str) -> None:
    arg, expected = next((a, e) for a, e in scenario.targets.items() if a.startswith(f"--target-{kind}="))
    restored = pg_env.restored_cluster(f"pitr-{kind}")
    result = pg_env.backupd("restore", JOB, "--to", str(restored.data), arg, check=True)
    assert scenario.backup_id in result.out and "pg_ctl" in result.out
    assert (restored.data / "recovery.signal").exists()
    assert oct(restored.data.stat().st_mode & 0o777) == "0o700"
    pg_env.start_restored(restored)
    try:
        assert phases(pg_env, restored) == expected
    finally:
        restored.stop()


def test_dry_run_prints_plan_and_touches_nothing(pg_env: PgEnv, scenario: Scenario) -> None:
    target = pg_env.root / "never"
    arg = next(a for a in scenario.targets if a.startswith("--target-time="))
    result = pg_env.backupd("restore", JOB, "--to", str(target), arg, "--dry-run", check=True)
    assert "dry run" in result.out and scenario.backup_id in result.out
    assert "WAL: from 00000001/" in result.out and "restorable window" in result.out
    assert not target.exists()


def test_dry_run_of_a_named_backup_describes_the_same_window(pg_env: PgEnv, scenario: Scenario) -> None:
    """Naming the backup reads only its manifest to choose it; the plan still describes the job's window."""
    target = str(pg_env.root / "never")
    unnamed = pg_env.backupd("restore", JOB, "--to", target, "--dry-run", check=True)
    named = pg_env.backupd("restore", JOB, "--to", target, "--backup", scenario.backup_id, "--dry-run", check=True)
    window = [line for line in unnamed.out.splitlines() if "restorable window" in line]
    assert window and window == [line for line in named.out.splitlines() if "restorable window" in line]
    assert named.out == unnamed.out


def test_target_outside_window_is_refused(pg_env: PgEnv, scenario: Scenario) -> None:
    for arg in ("--target-time=2000-01-01T00:00:00Z", "--target-time=2999-01-01T00:00:00Z",
                "--target-lsn=FF/0"):
        result = pg_env.backupd("restore", JOB, "--to", str(pg_env.root / "never"), arg)
        assert result.code == 2, result.err
        assert "restorable window" in result.err or "end of the archived WAL" in result.err
    assert not (pg_env.root / "never").exists()


def test_target_after_the_newest_commit_replays_to_the_end(pg_env: PgEnv, scenario: Scenario) -> None:
    """Between the last commit and the last segment's arrival: PostgreSQL alone would fail the recovery
    ("recovery ended before configured recovery target was reached"); the state there is the archive's end."""
    import datetime as dt

    arrived = max(path.stat().st_mtime for path in (pg_env.repo / JOB / "wal").rglob("*.zst.age")
                  if ".history" not in path.name)
    moment = dt.datetime.fromtimestamp(arrived, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    restored = pg_env.restored_cluster("after-last-commit")
    plan = pg_env.backupd("restore", JOB, "--to", str(restored.data), f"--target-time={moment}", "--dry-run",
                          check=True)
    assert "is after the newest commit in the archived WAL" in plan.out, plan.out  # the plan says what restore does
    assert "recovery replays to the end of the archive" in plan.out and not restored.data.exists()
    keyless = run_backupd("restore", JOB, "--to", str(restored.data), f"--target-time={moment}", "--dry-run",
                          config=pg_env.config, env={"BACKUPD_ENCRYPTION__IDENTITY_FILE": str(pg_env.root / "none")})
    assert keyless.code == 0, keyless.err
    assert "(not compared with the archive's newest commit: identity file" in keyless.out, keyless.out
    result = pg_env.backupd("restore", JOB, "--to", str(restored.data), f"--target-time={moment}", check=True)
    assert "is after the newest commit in the archived WAL" in result.out, result.out
    assert "no target: replay to the end of the archived WAL" in result.out
    assert "recovery_target_time =" not in (restored.data / "postgresql.auto.conf").read_text()
    pg_env.start_restored(restored)
    try:
        with restored.connect("shop") as conn:
            assert conn.execute("SELECT to_regclass('marks')").fetchone()[0] is None  # the drop was replayed
    finally:
        restored.stop()


def test_no_target_then_timeline_switch(pg_env: PgEnv, scenario: Scenario) -> None:
    """The primary itself restored in place (--archive-mode preserve) promotes to timeline 2 and goes on
    archiving into its job; a later restore from the same base backup follows that timeline."""
    primary = pg_env.cluster
    primary.stop()
    primary.data.rename(primary.data.with_name("data-before-restore"))
    pg_env.backupd("restore", JOB, "--to", str(primary.data), "--archive-mode", "preserve", check=True)
    primary.start()
    primary.wait_promoted()
    with primary.connect("shop") as conn:
        assert conn.execute("SELECT to_regclass('marks')").fetchone()[0] is None  # the drop was replayed
        conn.execute("CREATE TABLE after_switch AS SELECT g AS id FROM generate_series(1, 42) g")
    tl = pg_env.switch_and_wait_archived()
    assert int(tl[:8], 16) >= 2
    histories = list((pg_env.repo / JOB / "wal").glob("*/*.history.zst.age"))
    assert histories, "the new timeline's history file was not archived"
    second = pg_env.restored_cluster("tl2-again")
    plan = pg_env.backupd("restore", JOB, "--to", str(second.data), "--dry-run", check=True).out
    assert "along timeline" not in plan  # no fork: recovery follows the newest timeline
    pg_env.backupd("restore", JOB, "--to", str(second.data), check=True)
    pg_env.start_restored(second)
    try:
        with second.connect("shop") as conn:
            assert conn.execute("SELECT count(*) FROM after_switch").fetchone()[0] == 42
    finally:
        second.stop()
    # The drill (sandboxed, WAL staged by backupd) follows the same timelines: history files come from the stager.
    drill = pg_env.backupd("verify", JOB, "--pitr-drill", "--json", as_postgres=False, timeout=300)
    assert drill.code == 0, drill.out + drill.err
    report = json.loads(drill.out)["reports"][0]
    assert next(s for s in report["steps"] if s["step"] == "pitr drill")["result"] == "passed", report["problems"]


def test_verify_physical_backup(pg_env: PgEnv, scenario: Scenario) -> None:
    result = pg_env.backupd("verify", JOB, "--backup", scenario.backup_id, as_postgres=False, check=True)
    assert "passed" in result.out or result.code == 0
    reports = list((pg_env.repo / JOB / "verify").glob("*.json"))
    assert reports


def test_restore_refuses_non_empty_directory(pg_env: PgEnv, scenario: Scenario) -> None:
    target = pg_env.root / "busy"
    target.mkdir()
    (target / "precious").write_text("keep")
    dry = pg_env.backupd("restore", JOB, "--to", str(target), "--dry-run", as_postgres=False)
    assert dry.code == 1 and scenario.backup_id in dry.out and "directory is not empty" in dry.err
    result = pg_env.backupd("restore", JOB, "--to", str(target), as_postgres=False)
    assert result.code == 1 and "not empty" in result.err
    assert (target / "precious").read_text() == "keep"


def test_missing_segment_fails_verification(pg_env: PgEnv, scenario: Scenario) -> None:
    """Runs last in this module: it removes an archived segment inside the backup's WAL range onwards."""
    wal = pg_env.repo / JOB / "wal" / "00000001"
    segments = sorted((p for p in wal.rglob("*.zst.age") if len(p.name) == len("0" * 24 + ".zst.age")),
                      key=lambda p: p.name)
    first = json.loads(pg_env.backupd("show", scenario.backup_id, "--json", check=True).out)["metadata"]["pitr"]
    assert len(segments) >= 3
    victim = segments[-2]  # not the newest: a hole inside the sequence
    assert victim.name.split(".")[0] >= first["first_log"].split("/")[1]
    victim.unlink()
    result = pg_env.backupd("verify", JOB, "--integrity-only", "--backup", scenario.backup_id, as_postgres=False)
    assert result.code == 3, result.out + result.err
    assert f"missing WAL segment 00000001/{victim.name.split('.')[0]}" in result.out + result.err


def test_commit_times_are_read_from_pg_waldump_output() -> None:
    import datetime as dt

    from drivers.postgres.waldump import commit_times

    output = (
        "rmgr: Transaction len (rec/tot):     82/    82, tx:        725, lsn: 0/019436E0, prev 0/01943690, "
        "desc: COMMIT 2026-12-01 09:02:26.537816 UTC; inval msgs: catcache 21 snapshot 1214; sync\n"
        "rmgr: Transaction len (rec/tot):     34/    34, tx:        726, lsn: 0/019437E0, prev 0/019436E0, "
        "desc: ABORT 2026-12-01 09:02:27 UTC\n"
        "rmgr: Transaction len (rec/tot):     66/    66, tx:        727, lsn: 0/019438E0, prev 0/019437E0, "
        "desc: COMMIT_PREPARED 4: 2026-12-01 09:02:28.5 UTC\n"
        "rmgr: Transaction len (rec/tot):     66/    66, tx:          0, lsn: 0/019439E0, prev 0/019438E0, "
        "desc: INVALIDATION ; inval msgs: catcache 7\n")
    utc = dt.timezone.utc
    assert commit_times(output) == [dt.datetime(2026, 12, 1, 9, 2, 26, 537816, utc),
                                    dt.datetime(2026, 12, 1, 9, 2, 27, tzinfo=utc),
                                    dt.datetime(2026, 12, 1, 9, 2, 28, 500000, utc)]
