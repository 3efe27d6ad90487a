"""PostgreSQL logical backups through the real CLI: round trip with checksums, --table, --clean, --jobs,
verification, `check`, and no password in any child's argv."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from drivers.postgres import backendnice, dumpheader
from pg_fixtures import BACKUPD_EXE, JOB, PASSWORD, PG_BIN, PgEnv, pg_env  # noqa: F401  (fixture)
from support import stored_report

ARCHIVE_LOGS = False
METHOD = "logical"
TABLES = {"public.customers": 300, "public.orders": 20000, "sales.invoices": 1500}


def fingerprint(env: PgEnv, dbname: str) -> dict[str, tuple[int, str]]:
    """Row count and an md5 over every row, per table."""
    result = {}
    with env.cluster.connect(dbname) as conn:
        tables = conn.execute("SELECT schemaname || '.' || tablename FROM pg_tables "
                              "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1").fetchall()
        for (table,) in tables:
            count, digest = conn.execute(
                f"SELECT count(*), md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {table} t"
            ).fetchone()
            result[table] = (count, digest)
    return result


@pytest.fixture(scope="module")
def backup_id(pg_env: PgEnv) -> str:
    pg_env.sql("CREATE SCHEMA sales; GRANT USAGE ON SCHEMA sales TO backup")
    pg_env.sql("CREATE TABLE customers (id int PRIMARY KEY, name text)")
    pg_env.sql("INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, 300) g")
    pg_env.sql("CREATE TABLE orders (id bigserial PRIMARY KEY, customer int REFERENCES customers, "
               "amount numeric(10,2), note text)")
    pg_env.sql("INSERT INTO orders (customer, amount, note) SELECT 1 + g % 300, g * 1.25, md5(g::text) "
               "FROM generate_series(1, 20000) g")
    pg_env.sql("CREATE INDEX orders_customer ON orders (customer)")
    pg_env.sql("CREATE TABLE sales.invoices AS SELECT g AS id, now() AS at FROM generate_series(1, 1500) g")
    # a superuser-only extension and a trusted one with a comment: verification restores as a plain role
    pg_env.sql("CREATE EXTENSION pg_stat_statements; CREATE EXTENSION citext")
    pg_env.sql("COMMENT ON TABLE customers IS 'who buys'")
    return pg_env.backupd("backup", JOB, check=True).out.strip()


def test_manifest_has_counts_from_the_snapshot(pg_env: PgEnv, backup_id: str) -> None:
    shown = json.loads(pg_env.backupd("show", backup_id, "--json", check=True).out)
    assert shown["row_counts"] == TABLES
    assert [o["name"] for o in shown["objects"]] == ["dump", "globals"]
    assert shown["metadata"]["database"] == "shop"
    # pg_dump's version comes from its archive header, not from a second process run beside the dump
    release = subprocess.run([str(PG_BIN / "pg_dump"), "--version"], capture_output=True, text=True,
                             check=True).stdout.split()[2]
    assert shown["tool_versions"]["pg_dump"] == shown["tool_versions"]["pg_dumpall"] == release


def test_the_row_count_backend_is_reniced_only_when_it_is_a_local_one(pg_env: PgEnv) -> None:
    with pg_env.cluster.connect("shop") as conn:
        pid, started = conn.execute(
            "SELECT pg_backend_pid(), extract(epoch FROM pg_postmaster_start_time())::float8").fetchone()
        assert backendnice.lower(conn, 10)
        assert int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[16]) == 10
        assert backendnice.lower(conn, 5) and backendnice.lower(conn, 10)  # never raised back
        assert int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[16]) == 10
        # the pid a remote server reports may name anything here: a backend of another postmaster, or no backend
        assert backendnice.is_local_backend(pid, started)
        assert not backendnice.is_local_backend(pid, started + 3600)
        assert not backendnice.is_local_backend(os.getpid(), started)


def test_the_dump_header_names_database_and_versions(pg_env: PgEnv) -> None:
    dump = subprocess.run([str(PG_BIN / "pg_dump"), "-Fc", "-Z0", "--schema-only", "-h", str(pg_env.cluster.socket_dir),
                           "-p", str(pg_env.cluster.port), "-U", "postgres", "shop"],
                          capture_output=True, check=True).stdout
    header = dumpheader.parse(dump[:dumpheader.HEAD_SIZE])
    assert header.database == "shop" and header.archive_version[:2] == (1, 14)
    assert header.server_version.startswith("15.") and header.pg_dump_release.startswith("15.")
    for broken in (b"PGDMX" + dump[5:64], dump[:40], dump[:5] + bytes([1, 99, 0]) + dump[8:64]):
        with pytest.raises(dumpheader.HeaderError):
            dumpheader.parse(broken)


def test_round_trip_equal_counts_and_checksums(pg_env: PgEnv, backup_id: str) -> None:
    result = pg_env.backupd("restore", JOB, "--to", pg_env.cluster.url("shop_copy"), check=True)
    assert "created database shop_copy" in result.out
    assert fingerprint(pg_env, "shop_copy") == fingerprint(pg_env, "shop")
    assert {t: c for t, (c, _) in fingerprint(pg_env, "shop_copy").items()} == TABLES


def test_non_empty_target_is_refused_unless_clean(pg_env: PgEnv, backup_id: str) -> None:
    pg_env.sql("CREATE DATABASE shop_busy")
    pg_env.sql("CREATE TABLE customers (id int PRIMARY KEY, name text); INSERT INTO customers VALUES (1, 'x')",
               dbname="shop_busy")
    dry = pg_env.backupd("restore", JOB, "--to", pg_env.cluster.url("shop_busy"), "--dry-run")
    assert dry.code == 1 and "plan (dry run, nothing touched)" in dry.out and "not empty" in dry.err
    assert pg_env.backupd("restore", JOB, "--to", pg_env.cluster.url("shop_busy"), "--clean", "--dry-run").code == 0
    result = pg_env.backupd("restore", JOB, "--to", pg_env.cluster.url("shop_busy"))
    assert result.code == 1 and "not empty" in result.err and "--clean" in result.err
    assert pg_env.sql("SELECT count(*) FROM customers", dbname="shop_busy") == [(1,)]
    pg_env.backupd("restore", JOB, "--to", pg_env.cluster.url("shop_busy"), "--clean", check=True)
    assert fingerprint(pg_env, "shop_busy") == fingerprint(pg_env, "shop")


def test_table_restores_only_that_table(pg_env: PgEnv, backup_id: str) -> None:
    pg_env.backupd("restore", JOB, "--to", pg_env.cluster.url("shop_one"), "--table", "customers", check=True)
    found = fingerprint(pg_env, "shop_one")
    assert list(found) == ["public.customers"]
    assert found["public.customers"] == fingerprint(pg_env, "shop")["public.customers"]


def test_parallel_restore(pg_env: PgEnv, backup_id: str) -> None:
    pg_env.backupd("restore", JOB, "--to", pg_env.cluster.url("shop_par"), "--jobs", "2", check=True)
    assert fingerprint(pg_env, "shop_par") == fingerprint(pg_env, "shop")
    assert not list((pg_env.state_dir / "spool" / JOB).glob("pg_restore-*"))  # spooled dump removed


def test_point_in_time_target_needs_physical(pg_env: PgEnv, backup_id: str) -> None:
    result = pg_env.backupd("restore", JOB, "--to", pg_env.cluster.url("nope"), "--target-xid=5")
    assert result.code == 2 and "physical" in result.err


def test_verify_logical(pg_env: PgEnv, backup_id: str) -> None:
    pg_env.backupd("verify", JOB, "--backup", backup_id, as_postgres=False, check=True)
    report = stored_report(sorted((pg_env.repo / JOB / "verify").glob("*.json"))[-1], pg_env.identity)
    assert report["result"] == "passed"
    assert report["counts_found"] == TABLES


def test_check_reports_each_line(pg_env: PgEnv, backup_id: str) -> None:
    result = pg_env.backupd("check", JOB)
    assert result.code == 0, result.out + result.err
    assert "ok    jobs.pg: connection" in result.out and "pg_read_all_data" in result.out


def test_no_password_in_any_child_cmdline(pg_env: PgEnv, backup_id: str) -> None:
    argv = ["runuser", "-u", "postgres", "--", str(BACKUPD_EXE), "--config", str(pg_env.config),
            "--log-format", "json", "backup", JOB]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/tmp")
    seen_tools: set[str] = set()
    leaks: list[str] = []
    while proc.poll() is None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if PASSWORD in cmdline:
                leaks.append(cmdline)
            for tool in ("pg_dump", "pg_dumpall"):
                if f"bin/{tool} " in cmdline:
                    seen_tools.add(tool)
        time.sleep(0.005)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert not leaks
    assert "pg_dump" in seen_tools, "never saw pg_dump running; the scan proves nothing"
    assert PASSWORD.encode() not in out + err
