"""Hostile backup content cannot turn verification, the PITR drill or a restore against the host.

Each attack is set up on a throwaway primary as an attacker would (a database user
with no privileges, or whoever can write the server's configuration), backed up
with backupd, then verified: the markers its commands would leave on the host must
not appear, and the verdict must stay honest.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from backupd.context import JobContext
from backupd.settings import load_settings
from drivers.postgres import verify as pg_verify
from support import stored_report
from pg_fixtures import JOB, PgEnv, pg_env  # noqa: F401  (fixture: physical, archive_logs on)

ARCHIVE_LOGS = True
METHOD = "physical"

#: Runs ``touch <marker>-<tag>`` through COPY TO PROGRAM; only a superuser (or a member of
#: pg_execute_server_program) may, so the exception handler keeps it silent for anyone else.
#: COPY is refused in a non-volatile function: the immutable one (an index expression needs it)
#: calls a volatile one.
TOUCH_FUNCTIONS = ("""
CREATE FUNCTION mallory.run(tag text) RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    EXECUTE format('COPY (SELECT 1) TO PROGRAM %L', 'touch {marker}-' || tag);
EXCEPTION WHEN others THEN NULL;
END $$
""", """
CREATE FUNCTION mallory.touch(tag text, v int) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    PERFORM mallory.run(tag);
    RETURN true;
END $$
""")


def markers(env: PgEnv) -> list[str]:
    return sorted(path.name for path in env.root.glob("pwned*"))


def mallory(env: PgEnv) -> psycopg.Connection:
    return psycopg.connect(host=str(env.cluster.socket_dir), port=env.cluster.port, user="mallory", dbname="shop",
                           autocommit=True)


def without_sandbox(env: PgEnv) -> PgEnv:
    """The same job with verify.sandbox = "off": what least privilege and backupd's own configuration hold alone."""
    text = env.config.read_text()
    assert "checks = [" in text
    config = env.root / "backupd-nosandbox.toml"
    config.write_text(text.replace("checks = [", 'sandbox = "off", checks = [', 1))
    shutil.chown(config, "postgres", "postgres")
    return dataclasses.replace(env, config=config)


def latest_report(env: PgEnv) -> dict:
    return stored_report(sorted((env.repo / JOB / "verify").glob("*.json"))[-1], env.identity)


@pytest.fixture(scope="module")
def attacker(pg_env: PgEnv) -> PgEnv:  # noqa: F811
    """A login role with no privileges but a schema of its own (as any application user has)."""
    pg_env.sql("CREATE ROLE mallory LOGIN", dbname="postgres")
    pg_env.sql("CREATE SCHEMA mallory AUTHORIZATION mallory")
    return pg_env


def test_logical_verify_runs_no_superuser_only_code(attacker: PgEnv) -> None:
    env = attacker
    with mallory(env) as conn:
        for statement in TOUCH_FUNCTIONS:
            conn.execute(statement.replace("{marker}", str(env.root / "pwned")))
        conn.execute("CREATE TABLE mallory.t (id int PRIMARY KEY CHECK (mallory.touch('check', id)))")
        conn.execute("INSERT INTO mallory.t SELECT generate_series(1, 3)")
        conn.execute("CREATE INDEX t_expr ON mallory.t (mallory.touch('index', id))")
    assert markers(env) == []  # production never ran the command: mallory is no superuser
    backup_id = env.backupd("backup", JOB, "--method", "logical", check=True).out.strip()
    for where in (env, without_sandbox(env)):
        result = where.backupd("verify", JOB, "--backup", backup_id, as_postgres=False)
        assert markers(env) == [], "verification ran the dump's COPY TO PROGRAM on the host"
        assert result.code == 0, result.out + result.err
        report = latest_report(env)
        assert report["result"] == "passed" and report["counts_found"]["mallory.t"] == 3
        restore_step = next(step for step in report["steps"] if step["step"] == "pg_restore")
        assert restore_step["role"] == pg_verify.ROLE


def test_logical_content_that_fails_to_restore_is_a_failed_verification(attacker: PgEnv) -> None:
    """Not "full ok" (it did not restore) and not exit 1 (backupd could run): exit 3 with a saved report."""
    env = attacker
    with mallory(env) as conn:
        conn.execute("CREATE FUNCTION mallory.only_me(v int) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$ "
                     "BEGIN IF current_user <> 'mallory' THEN RAISE EXCEPTION 'only mallory'; END IF; "
                     "RETURN true; END $$")
        conn.execute("CREATE TABLE mallory.poison (id int CHECK (mallory.only_me(id)))")
        conn.execute("INSERT INTO mallory.poison VALUES (1)")
    try:
        backup_id = env.backupd("backup", JOB, "--method", "logical", check=True).out.strip()
        result = env.backupd("verify", JOB, "--backup", backup_id, as_postgres=False)
    finally:
        with mallory(env) as conn:
            conn.execute("DROP TABLE mallory.poison")
    assert result.code == 3, result.out + result.err
    assert f"{backup_id}  full  BAD" in result.out and "the dump does not restore" in result.out
    report = latest_report(env)
    assert report["backup_id"] == backup_id and report["result"] == "failed"


def test_backup_configuration_runs_nothing_in_verify_or_the_drill(attacker: PgEnv) -> None:
    env = attacker
    evil = env.root / "evil.conf"
    evil.write_text(f"archive_cleanup_command = 'touch {env.root}/pwned-include'\n")
    shutil.chown(evil, "postgres", "postgres")
    auto = env.cluster.data / "postgresql.auto.conf"
    original = auto.read_text()
    hostile = (f"include_if_exists = '{evil}'\n"
               f"recovery_end_command = 'touch {env.root}/pwned-recovery-end'\n"
               f"shared_preload_libraries = 'no_such_library_backupd'\n"
               f"ssl = on\nssl_passphrase_command = 'touch {env.root}/pwned-ssl'\n")
    auto.write_text(original + hostile)  # not reloaded: the primary never applies it, the backup carries it
    try:
        backup_id = env.backupd("backup", JOB, check=True).out.strip()
    finally:
        auto.write_text(original)
    env.sql("CREATE TABLE IF NOT EXISTS after_backup (id int)")
    env.sql("INSERT INTO after_backup VALUES (1)")
    env.switch_and_wait_archived()
    result = env.backupd("verify", JOB, "--backup", backup_id, "--pitr-drill", "--json", as_postgres=False,
                         timeout=300)
    assert markers(env) == [], "the backup's configuration ran during verification or the drill"
    assert result.code == 0, result.out + result.err
    unsandboxed = without_sandbox(env).backupd("verify", JOB, "--backup", backup_id, as_postgres=False)
    assert markers(env) == [] and unsandboxed.code == 0, unsandboxed.out + unsandboxed.err
    report = json.loads(result.out)["reports"][0]
    assert report["result"] == "passed", report["problems"]
    drill = next(step for step in report["steps"] if step["step"] == "pitr drill")
    assert drill["result"] == "passed"
    recovery = next(step for step in drill["steps"] if step["step"] == "recovery to target")
    assert recovery["wal_staged"] >= 1  # WAL came from backupd's stager, not from wal-fetch inside

    # restore (not verify) keeps the backup's configuration, and says so.
    target = env.root / "restored-hostile" / "data"
    out = env.backupd("restore", JOB, "--backup", backup_id, "--to", str(target), check=True).out
    assert "the restored configuration" in out and "is the backup's own" in out
    assert "recovery_end_command" in (target / "postgresql.auto.conf").read_text()
    assert markers(env) == []


def test_failed_physical_restore_leaves_no_data_directory(attacker: PgEnv) -> None:
    env = attacker
    backup_id = env.backupd("backup", JOB, check=True).out.strip()
    base = next((env.repo / JOB / "backups" / backup_id).glob("base*"))
    data = bytearray(base.read_bytes())
    data[-len(data) // 4] ^= 0x01  # late in the stream: files are already extracted when it fails
    base.write_bytes(bytes(data))
    parent = env.root / "restore-fails"
    target = parent / "data"
    result = env.backupd("restore", JOB, "--backup", backup_id, "--to", str(target))
    assert result.code != 0, result.out
    assert not target.exists()
    assert list(parent.iterdir()) == []  # no half-written work directory either
    target.mkdir()
    again = env.backupd("restore", JOB, "--backup", backup_id, "--to", str(target))
    assert again.code != 0 and list(target.iterdir()) == []


def test_programs_run_by_the_scratch_server_see_nothing_of_the_host(attacker: PgEnv) -> None:
    """A superuser of the scratch server (what restored content may become) runs shell commands in the sandbox."""
    env = attacker
    secret = env.identity.read_text().split("AGE-SECRET-KEY-")[1][:20]
    ctx = JobContext(load_settings(env.config), JOB)
    scratch = Path(tempfile.mkdtemp(prefix="backupd-sandbox-test-", dir="/tmp"))
    try:
        cluster = pg_verify.scratch_cluster(scratch, 15, bin_dir=ctx.driver.options.bin_dir,
                                            sandbox=ctx.driver.scratch_sandbox)
        try:
            cluster.init({"listen_addresses": "", "fsync": False})
            cluster.start()
            probe = (f"cat {env.identity} 2>&1; ls {env.cluster.data} 2>&1; ls {env.state_dir} 2>&1; "
                     f"python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {env.cluster.port}), 3); "
                     f"print(\"network open\")' 2>&1 | tail -1; id -un; echo done")
            with cluster.connect() as conn:
                conn.execute("CREATE TABLE seen (line text)")
                conn.execute(sql.SQL("COPY seen FROM PROGRAM {}").format(sql.Literal(probe)))
                lines = [row[0] for row in conn.execute("SELECT line FROM seen")]
        finally:
            cluster.close()
    finally:
        ctx.close()
        shutil.rmtree(scratch, ignore_errors=True)
    text = "\n".join(lines)
    assert lines[-1] == "done", text
    assert secret not in text and "PG_VERSION" not in text and "postgresql.conf" not in text
    assert text.count("No such file or directory") >= 3, text
    assert "network open" not in text and ("refused" in text or "unreachable" in text), text
    assert lines[-2] != "root", text
