"""Verification: restore into a throwaway cluster, recover, check indexes, count rows, run the user's SQL."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from backupd.driver import BackupSource, Check, RestoreRequest, RestoreTarget, VerifyOutcome
from backupd.errors import DriverError, IntegrityError, UsageError
from backupd.pipeline import READ_CHUNK
from backupd.timeutil import format_timestamp
from drivers.postgres import logical, physical, pitr
from drivers.postgres.cluster import Cluster, chown_tree
from drivers.postgres.connection import find_tool
from drivers.postgres.walnames import parse_segment, segment_name

if TYPE_CHECKING:
    from drivers.postgres.driver import PostgresDriver

BTREE_INDEXES = """
SELECT c.oid::regclass::text FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
WHERE a.amname = 'btree' AND c.relpersistence <> 't' AND i.indisvalid AND i.indisready
ORDER BY 1
"""


def run_checks(conn: psycopg.Connection, checks: list[str]) -> list[Check]:
    results = []
    for query in checks:
        try:
            row = conn.execute(query).fetchone()
            ok = bool(row and row[0])
            results.append(Check(query, ok, "" if ok else f"returned {row[0] if row else 'no row'}"))
        except psycopg.Error as exc:
            results.append(Check(query, False, f"error: {str(exc).strip()}"))
    return results


def amcheck(conn: psycopg.Connection) -> tuple[int, list[str]]:
    """bt_index_check on every B-tree index of the connected database: (indexes checked, problems)."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
    problems = []
    indexes = [row[0] for row in conn.execute(BTREE_INDEXES)]
    for index in indexes:
        try:
            conn.execute("SELECT bt_index_check(%s::regclass)", (index,))
        except psycopg.Error as exc:
            problems.append(f"index {index}: {str(exc).strip()}")
    return len(indexes), problems


def verify(driver: "PostgresDriver", source: BackupSource, scratch: Path, checks: list[str]) -> VerifyOutcome:
    manifest = source.manifest
    major = int(manifest.tool_versions.get("postgresql", "0") or 0) // 10000 or None
    bin_dir = Path(find_tool("initdb", driver.options.bin_dir, major)).parent
    os.chmod(scratch, 0o711)  # the postgres OS user must reach its directory inside
    cluster = Cluster(scratch / "pg", bin_dir, driver.context.settings.os_user)
    outcome = VerifyOutcome()
    try:
        if manifest.method == "logical":
            _verify_logical(cluster, source, outcome, checks, bin_dir)
        else:
            _verify_physical(driver, cluster, source, outcome, checks)
    finally:
        cluster.close()
    return outcome


def _timed(outcome: VerifyOutcome, step: str, started: float, **extra: Any) -> None:
    outcome.steps.append({"step": step, "seconds": round(time.monotonic() - started, 3), **extra})


def _verify_logical(cluster: Cluster, source: BackupSource, outcome: VerifyOutcome, checks: list[str],
                    bin_dir: Path) -> None:
    database = source.manifest.metadata.get("database") or "postgres"
    started = time.monotonic()
    cluster.init({"listen_addresses": "", "fsync": False})
    cluster.start()
    _timed(outcome, "scratch cluster", started, port=cluster.port)
    started = time.monotonic()
    with cluster.connect() as admin:
        if database != "postgres":
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(database)))
    logical.restore_into_scratch(str(bin_dir / "pg_restore"), source, cluster.conninfo(database))
    _timed(outcome, "pg_restore", started)
    with cluster.connect(database) as conn:
        started = time.monotonic()
        outcome.row_counts = logical.row_counts(conn)
        _timed(outcome, "row counts", started, tables=len(outcome.row_counts))
        outcome.checks.extend(run_checks(conn, checks))


def _fetch_wal(source: BackupSource, pg_wal: Path, first: str, last: str, segment_size: int) -> int:
    """The WAL the backup needs to become consistent, straight into pg_wal."""
    timeline, first_name = first.split("/")
    tli, start = parse_segment(first_name, segment_size)
    _, end = parse_segment(last.split("/")[1], segment_size)
    count = 0
    for segno in range(start, end + 1):
        name = segment_name(tli, segno, segment_size)
        with source.open_log("wal", f"{timeline}/{name}") as stream, open(pg_wal / name, "wb") as out:
            while chunk := stream.read(READ_CHUNK):
                out.write(chunk)
        count += 1
    return count


def _verify_physical(driver: "PostgresDriver", cluster: Cluster, source: BackupSource, outcome: VerifyOutcome,
                     checks: list[str]) -> None:
    meta = source.manifest.metadata
    started = time.monotonic()
    cluster.prepare_root()
    cluster.data.mkdir(mode=0o700)
    files = physical.restore_files(source, cluster.data)
    _timed(outcome, "extract", started, files=files)
    if meta.get("wal_method") == "none":
        started = time.monotonic()
        try:
            count = _fetch_wal(source, cluster.data / "pg_wal", meta["wal_range"]["first"], meta["wal_range"]["last"],
                               int(meta["wal_segment_size"]))
        except DriverError:
            raise
        except Exception as exc:
            raise IntegrityError(f"the WAL this backup needs cannot be fetched: {exc}") from None
        _timed(outcome, "fetch wal", started, segments=count)
    chown_tree(cluster.root, cluster.user)
    cluster.configure({"listen_addresses": "", "archive_mode": False, "restore_command": "false",
                       "recovery_target": "immediate", "recovery_target_action": "promote", "fsync": False,
                       "hot_standby": True})
    (cluster.data / "recovery.signal").write_text("")
    chown_tree(cluster.data / "recovery.signal", cluster.user)
    started = time.monotonic()
    try:
        cluster.start()
        cluster.wait_promoted()
    except DriverError as exc:
        raise IntegrityError(f"the restored cluster did not recover: {exc}") from None
    _timed(outcome, "recovery", started)
    started = time.monotonic()
    with cluster.connect() as admin:
        databases = [row[0] for row in admin.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1")]
    indexes, problems, counts = 0, [], {}
    for database in databases:
        with cluster.connect(database) as conn:
            checked, found = amcheck(conn)
            indexes += checked
            problems.extend(f"{database}: {p}" for p in found)
            counts.update({f"{database}.{t}": n for t, n in logical.row_counts(conn).items()})
    _timed(outcome, "amcheck", started, indexes=indexes, problems=problems[:20])
    outcome.steps.append({"step": "row counts", "counts": counts})
    outcome.checks.append(Check(f"amcheck bt_index_check on {indexes} B-tree indexes", not problems,
                                "; ".join(problems[:5])))
    dbname = driver.conn.dbname
    if checks:
        target = dbname if dbname in databases else "postgres"
        with cluster.connect(target) as conn:
            outcome.checks.extend(run_checks(conn, checks))


TARGET_NOT_REACHED = "before configured recovery target was reached"
NOTHING_AFTER = "no commit after the target in the archived WAL: recovered to its end (the same state)"


def pitr_drill(driver: "PostgresDriver", source: BackupSource, scratch: Path, target: RestoreTarget) -> VerifyOutcome:
    """Restore the base backup as ``backupd restore --to DIR --target-time`` would, start it, query it.

    WAL comes through ``backupd wal-fetch`` (the restore_command a real restore
    writes), run by the postgres OS user. Stopped on success and failure alike.
    """
    manifest = source.manifest
    if manifest.method != "physical" or not manifest.metadata.get("pitr"):
        raise UsageError(f"backup {manifest.backup_id}: a PITR drill needs a physical backup taken with "
                         "archive_logs = true")
    major = int(manifest.tool_versions.get("postgresql", "0") or 0) // 10000 or None
    bin_dir = Path(find_tool("initdb", driver.options.bin_dir, major)).parent
    os.chmod(scratch, 0o711)  # the postgres OS user must reach its directory inside
    cluster = Cluster(scratch / "pg", bin_dir, driver.context.settings.os_user)
    outcome = VerifyOutcome()
    try:
        started = time.monotonic()
        cluster.prepare_root()
        cluster.data.mkdir(mode=0o700)
        files = physical.restore_files(source, cluster.data)
        _timed(outcome, "extract", started, files=files)
        request = RestoreRequest(to=str(cluster.data), target=target, target_action="promote")
        request, newest = driver.resolve_target(source.open_log, manifest, request)  # as restore does
        note = f"{NOTHING_AFTER} (newest commit {format_timestamp(newest)})" if newest else ""
        command = pitr.restore_command(driver.context.job, driver.context.config_path)
        pitr.write_recovery(cluster.data, pitr.recovery_settings(request, command), manifest.backup_id)
        driver.start_wal_prefetch(manifest)
        cluster.configure({"listen_addresses": "", "archive_mode": False, "fsync": False, "hot_standby": True})
        chown_tree(cluster.root, cluster.user)
        started = time.monotonic()
        try:
            _start_promoted(cluster)
        except DriverError as exc:
            if request.target is None or TARGET_NOT_REACHED not in _server_log(cluster):
                raise IntegrityError(f"the cluster restored to {format_timestamp(target.time or manifest.finished_at)}"
                                     f" did not recover: {exc}") from None
            # pg_waldump could not tell (not installed, no commit in the newest segments), PostgreSQL did:
            # no commit after the target in the archived WAL, so its end is the state at the target.
            cluster.stop("immediate")
            cluster.configure({"recovery_target_time": ""})
            note = NOTHING_AFTER
            try:
                _start_promoted(cluster)
            except DriverError as again:
                raise IntegrityError(f"the cluster restored to the end of the archived WAL did not recover: "
                                     f"{again}") from None
        _timed(outcome, "recovery to target", started, target_time=target.value, **({"note": note} if note else {}))
        try:
            with cluster.connect() as admin:
                admin.execute("SELECT 1").fetchone()
                databases = [row[0] for row in admin.execute(
                    "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1")]
                replayed = admin.execute("SELECT pg_last_xact_replay_timestamp()").fetchone()[0]
            outcome.checks.append(Check("SELECT 1", True))
            outcome.steps.append({"step": "accepts queries", "databases": len(databases),
                                  "last_replayed_commit": format_timestamp(replayed) if replayed else None})
            dbname = driver.conn.dbname
            with cluster.connect(dbname if dbname in databases else "postgres") as conn:
                outcome.checks.extend(run_checks(conn, driver.context.settings.verify.checks))
        except psycopg.Error as exc:
            raise IntegrityError(f"the cluster restored to {target.value} does not answer queries: "
                                 f"{str(exc).strip()}") from None
    finally:
        cluster.close()
    return outcome


def _start_promoted(cluster: Cluster) -> None:
    cluster.start()
    cluster.wait_promoted()


def _server_log(cluster: Cluster) -> str:
    try:
        return cluster.logfile.read_text(errors="replace")
    except OSError:
        return ""
