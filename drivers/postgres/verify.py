"""Verification: restore into a throwaway cluster, recover, check indexes, count rows, run the user's SQL."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import psycopg
from psycopg import sql

from backupd.driver import BackupSource, Check, RestoreRequest, RestoreTarget, VerifyOutcome
from backupd.errors import DriverError, IntegrityError, UsageError
from backupd.manifest import Manifest
from backupd.pipeline import READ_CHUNK
from backupd.sandbox import Sandbox, chown_to
from backupd.timeutil import format_timestamp
from backupd.usercheck import NO_ROW, Answer, judge
from drivers.postgres import logical, physical, pitr, scratchconf
from drivers.postgres.cluster import Cluster
from drivers.postgres.connection import one, find_tool
from drivers.postgres.recovery import RecoveryPlan
from drivers.postgres.walnames import parse_segment, segment_name
from drivers.postgres.walstage import WalStager

BTREE_INDEXES = """
SELECT c.oid::regclass::text FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
WHERE a.amname = 'btree' AND c.relpersistence <> 't' AND i.indisvalid AND i.indisready
ORDER BY 1
"""


def run_checks(conn: psycopg.Connection, checks: list[str]) -> list[Check]:
    """The job's ``verify.checks``: what each query's first column answered, judged by the core."""
    answers = []
    for query in checks:
        try:
            row = conn.execute(query).fetchone()
            answers.append(Answer(query, row[0] if row else NO_ROW))
        except psycopg.Error as exc:
            answers.append(Answer(query, error=f"error: {str(exc).strip()}"))
    return [judge(answer) for answer in answers]


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


ROLE = "backupd_verify"
#: A login role that owns the scratch database and nothing else: not superuser, no pg_execute_server_program,
#: pg_read_server_files or pg_write_server_files; the dump is restored, counted and checked as this role.
#: BYPASSRLS (no power outside the database) so that counts see every row, as the backup's did.
CREATE_ROLE = f"CREATE ROLE {ROLE} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION BYPASSRLS"
SERVER_ROLES = ("pg_execute_server_program", "pg_read_server_files", "pg_write_server_files")


def major_version(manifest: Manifest) -> int | None:
    return int(manifest.tool_versions.get("postgresql", "0") or 0) // 10000 or None


#: The driver's ``scratch_sandbox``: the sandbox for a server writing only the first list, reading the second.
SandboxFor = Callable[[list[Path], list[Path]], Sandbox]


def scratch_cluster(scratch: Path, major: int | None, *, bin_dir: str | None, sandbox: SandboxFor) -> Cluster:
    """A server under ``scratch``, run in the job's sandbox as its unprivileged OS user.

    ``bin_dir``: the job's PostgreSQL programs, looked for first (the options' ``bin_dir``).
    """
    programs = Path(find_tool("initdb", bin_dir, major)).parent
    readable = [] if programs.is_relative_to("/usr") else [programs.parent]
    scratch_sandbox = sandbox([scratch], readable)
    chown_to(scratch, scratch_sandbox.user)
    return Cluster(scratch / "pg", programs, scratch_sandbox)


def verify(source: BackupSource, scratch: Path, checks: list[str], *, bin_dir: str | None, sandbox: SandboxFor,
           dbname: str) -> VerifyOutcome:
    """Restore ``source`` into a scratch cluster and measure it; ``checks`` run in ``dbname`` (the job's
    database) when the restored cluster has it, else in postgres."""
    manifest = source.manifest
    cluster = scratch_cluster(scratch, major_version(manifest), bin_dir=bin_dir, sandbox=sandbox)
    outcome = VerifyOutcome()
    try:
        if manifest.method == "logical":
            _verify_logical(cluster, source, outcome, checks)
        else:
            _verify_physical(dbname, cluster, source, outcome, checks)
    finally:
        cluster.close()
    return outcome


def _timed(outcome: VerifyOutcome, step: str, started: float, **extra: Any) -> None:
    outcome.steps.append({"step": step, "seconds": round(time.monotonic() - started, 3), **extra})


def _verify_logical(cluster: Cluster, source: BackupSource, outcome: VerifyOutcome, checks: list[str]) -> None:
    database = source.manifest.metadata.get("database") or "postgres"
    started = time.monotonic()
    cluster.init({"listen_addresses": "", "fsync": False})
    cluster.start()
    _timed(outcome, "scratch cluster", started)
    started = time.monotonic()
    with cluster.connect("template1") as admin:
        admin.execute(CREATE_ROLE)
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        statement = "ALTER DATABASE {} OWNER TO {}" if exists else "CREATE DATABASE {} OWNER {} TEMPLATE template0"
        admin.execute(sql.SQL(statement).format(sql.Identifier(database), sql.Identifier(ROLE)))
        granted = one(admin.execute("SELECT rolsuper OR EXISTS (SELECT FROM unnest(%s::text[]) AS r "
                                "WHERE pg_has_role(rolname, r, 'MEMBER')) FROM pg_roles WHERE rolname = %s",
                                (list(SERVER_ROLES), ROLE)))[0]
        if granted:
            raise DriverError(f"the scratch role {ROLE} has server privileges; refusing to restore as it")
    pg_restore = str(cluster.bin_dir / "pg_restore")
    _create_extensions(cluster, database, logical.dump_extensions(pg_restore, source, str(cluster.root / "toc.sql"),
                                                                   cluster.sandbox))
    logical.restore_into_scratch(pg_restore, source, cluster.conninfo(database, user=ROLE), cluster.sandbox)
    _timed(outcome, "pg_restore", started, role=ROLE)
    with cluster.connect(database, user=ROLE) as conn:
        started = time.monotonic()
        try:
            outcome.row_counts = logical.row_counts(conn, nice=None)
        except psycopg.Error as exc:
            raise IntegrityError(f"counting the restored rows failed: {str(exc).strip()}") from None
        _timed(outcome, "row counts", started, tables=len(outcome.row_counts))
        outcome.checks.extend(run_checks(conn, checks))


def _create_extensions(cluster: Cluster, database: str, names: set[str]) -> None:
    """Extensions installed on this host that the dump creates in public, made by the superuser beforehand.

    The restoring role may create only trusted extensions; for the others (pg_stat_statements,
    postgis ...) the dump's ``CREATE EXTENSION IF NOT EXISTS`` then finds them made. Only an
    extension's own install script runs, from this host's PostgreSQL installation.
    """
    if not names:
        return
    with cluster.connect(database) as admin:
        available = {row[0] for row in admin.execute("SELECT name FROM pg_available_extensions")}
        for name in sorted(names & available):
            try:
                admin.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {} SCHEMA public").format(sql.Identifier(name)))
            except psycopg.Error as exc:
                raise IntegrityError(f"extension {name}, which the dump needs, cannot be created: "
                                     f"{str(exc).strip()}") from None


def _fetch_wal(source: BackupSource, pg_wal: Path, first: str, last: str, segment_size: int) -> int:
    """The WAL the backup needs to become consistent, straight into pg_wal (backupd writes it, from outside)."""
    timeline, first_name = first.split("/")
    tli, start = parse_segment(first_name, segment_size)
    _, end = parse_segment(last.split("/")[1], segment_size)
    count = 0
    for segno in range(start, end + 1):
        name = segment_name(tli, segno, segment_size)
        with source.open_log("wal", f"{timeline}/{name}") as stream, open(pg_wal / name, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            while chunk := stream.read(READ_CHUNK):
                out.write(chunk)
        count += 1
    return count


def _extract(cluster: Cluster, source: BackupSource, outcome: VerifyOutcome) -> None:
    started = time.monotonic()
    cluster.prepare_root()
    cluster.data.mkdir(mode=0o700)
    files = physical.restore_files(source, cluster.data)
    _timed(outcome, "extract", started, files=files)


def _own_config(cluster: Cluster, settings: dict[str, Any]) -> None:
    """The restored directory given to the sandbox's user, started with backupd's configuration only."""
    chown_to(cluster.root, cluster.user)
    control = scratchconf.control_settings(str(cluster.bin_dir / "pg_controldata"), cluster.data, cluster.sandbox)
    scratchconf.write_own_config(cluster, {**control, **settings})
    (cluster.data / "recovery.signal").write_text("")
    chown_to(cluster.data / "recovery.signal", cluster.user)


def _verify_physical(dbname: str, cluster: Cluster, source: BackupSource, outcome: VerifyOutcome,
                     checks: list[str]) -> None:
    meta = source.manifest.metadata
    _extract(cluster, source, outcome)
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
    _own_config(cluster, {"restore_command": "false", "recovery_target": "immediate",
                          "recovery_target_action": "promote"})
    started = time.monotonic()
    try:
        cluster.start()
        cluster.wait_promoted()
    except DriverError as exc:
        if cluster.killed():
            raise
        raise IntegrityError(f"the restored cluster did not recover: {exc}") from None
    _timed(outcome, "recovery", started)
    started = time.monotonic()
    with cluster.connect() as admin:
        databases = [row[0] for row in admin.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1")]
    indexes, problems, counts = 0, list[str](), dict[str, int]()
    for database in databases:
        with cluster.connect(database) as conn:
            checked, found = amcheck(conn)
            indexes += checked
            problems.extend(f"{database}: {p}" for p in found)
            counts.update({f"{database}.{t}": n for t, n in logical.row_counts(conn, nice=None).items()})
    _timed(outcome, "amcheck", started, indexes=indexes, problems=problems[:20])
    outcome.steps.append({"step": "row counts", "counts": counts})
    outcome.checks.append(Check(f"amcheck bt_index_check on {indexes} B-tree indexes", not problems,
                                "; ".join(problems[:5])))
    if checks:
        target = dbname if dbname in databases else "postgres"
        with cluster.connect(target) as conn:
            outcome.checks.extend(run_checks(conn, checks))


TARGET_NOT_REACHED = "before configured recovery target was reached"
NOTHING_AFTER = "no commit after the target in the archived WAL: recovered to its end (the same state)"


def pitr_drill(source: BackupSource, scratch: Path, target: RestoreTarget, plan: RecoveryPlan, *,
               bin_dir: str | None, sandbox: SandboxFor, dbname: str, checks: list[str]) -> VerifyOutcome:
    """Restore the base backup as ``backupd restore --to DIR --target-time`` would, start it, query it.

    The server runs in the sandbox with backupd's own configuration; WAL is staged into
    the scratch by backupd (``walstage``), not fetched by the server. Stopped on success
    and failure alike.
    """
    manifest = source.manifest
    if manifest.method != "physical" or not manifest.metadata.get("pitr"):
        raise UsageError(f"backup {manifest.backup_id}: a PITR drill needs a physical backup taken with "
                         "archive_logs = true")
    cluster = scratch_cluster(scratch, major_version(manifest), bin_dir=bin_dir, sandbox=sandbox)
    outcome = VerifyOutcome()
    view = plan.view_for([manifest])
    first = str(manifest.metadata.get("wal_range", {}).get("first", "")).rpartition("/")[2] or None
    stager = WalStager(scratch / "wal-stage", view.all_segments(), [n.rpartition("/")[2] for n in view.histories],
                       source.open_log, cluster.user, first=first)
    try:
        _extract(cluster, source, outcome)
        request = RestoreRequest(to=str(cluster.data), target=target, target_action="promote")
        request, newest = plan.resolve_target(source.open_log, manifest, request)  # as restore does
        note = f"{NOTHING_AFTER} (newest commit {format_timestamp(newest)})" if newest else ""
        settings = pitr.recovery_settings(request, stager.restore_command())
        stager.start()
        _own_config(cluster, settings)
        started = time.monotonic()
        try:
            _start_promoted(cluster, stager)
        except DriverError as exc:
            if cluster.killed():
                raise
            if request.target is None or TARGET_NOT_REACHED not in cluster.log_text():
                raise IntegrityError(f"the cluster restored to {format_timestamp(target.time or manifest.finished_at)}"
                                     f" did not recover: {exc}") from None
            # pg_waldump could not tell (not installed, no commit in the newest segments), PostgreSQL did:
            # no commit after the target in the archived WAL, so its end is the state at the target.
            cluster.stop("immediate")
            settings = {k: v for k, v in settings.items() if not k.startswith("recovery_target_")}
            scratchconf.write_own_config(cluster, {**scratchconf.control_settings(
                str(cluster.bin_dir / "pg_controldata"), cluster.data, cluster.sandbox), **settings})
            note = NOTHING_AFTER
            try:
                _start_promoted(cluster, stager)
            except DriverError as again:
                if cluster.killed():
                    raise
                raise IntegrityError(f"the cluster restored to the end of the archived WAL did not recover: "
                                     f"{again}") from None
        _timed(outcome, "recovery to target", started, target_time=target.value, wal_staged=stager.staged,
               **({"note": note} if note else {}))
        try:
            with cluster.connect() as admin:
                admin.execute("SELECT 1").fetchone()
                databases = [row[0] for row in admin.execute(
                    "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1")]
                replayed = one(admin.execute("SELECT pg_last_xact_replay_timestamp()"))[0]
            outcome.checks.append(Check("SELECT 1", True))
            outcome.steps.append({"step": "accepts queries", "databases": len(databases),
                                  "last_replayed_commit": format_timestamp(replayed) if replayed else None})
            with cluster.connect(dbname if dbname in databases else "postgres") as conn:
                outcome.checks.extend(run_checks(conn, checks))
        except psycopg.Error as exc:
            raise IntegrityError(f"the cluster restored to {target.value} does not answer queries: "
                                 f"{str(exc).strip()}") from None
    finally:
        cluster.close()
        stager.stop()
    return outcome


def _start_promoted(cluster: Cluster, stager: WalStager) -> None:
    cluster.start()
    cluster.wait_promoted()
    if stager.error:
        raise IntegrityError(f"the archived WAL could not be staged for recovery: {stager.error}")
