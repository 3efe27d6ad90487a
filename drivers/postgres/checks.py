"""``backupd check`` for a postgres job: connection, privileges, WAL settings, tools, a live WAL switch."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable, Iterator

import psycopg

from backupd.driver import Check, DriverContext
from backupd.errors import BackupdError, DriverError
from backupd.logarchive import LogArchive
from drivers.postgres import engine
from drivers.postgres.connection import one, Conn, find_tool
from drivers.postgres.logical import tool_version
from drivers.postgres.options import PostgresOptions
from drivers.postgres.walnames import archive_name

SWITCH_TIMEOUT = 60.0

# data_directory is for superusers and pg_read_all_settings only: pg_settings gives others NULL, not an error.
SERVER_FACTS = """
SELECT current_setting('server_version'), current_setting('server_version_num')::int,
       r.rolsuper, r.rolreplication, pg_has_role(current_user, 'pg_read_all_data', 'member'),
       current_setting('wal_level'), current_setting('archive_mode'),
       (SELECT setting FROM pg_settings WHERE name = 'archive_command'),
       pg_is_in_recovery(), (SELECT setting FROM pg_settings WHERE name = 'data_directory'),
       current_user, current_database(), pg_has_role(current_user, 'pg_read_all_settings', 'member'),
       has_function_privilege('pg_catalog.pg_switch_wal()', 'EXECUTE')
FROM pg_roles r WHERE r.rolname = current_user
"""


def _ident(name: str) -> str:
    """A role name as SQL: bare when it can be, else double-quoted."""
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else '"' + name.replace('"', '""') + '"'


def grant(statement: str, where: str = "any database") -> str:
    """A check's hint: the statement a superuser runs, and where."""
    return f"missing: {statement} (as a superuser, in {where})"


def run(conn: Conn, options: PostgresOptions, context: DriverContext, method: str,
        wal_archive: Callable[[], LogArchive], switch_timeout: float = SWITCH_TIMEOUT) -> Iterator[Check]:
    """``backupd check`` for a job backing up with ``method``: connection, privileges, tools, archiving."""
    settings = context.settings
    job = context.job
    try:
        pg = conn.connect()
    except BackupdError as exc:
        yield Check("connection", False, str(exc))
        return
    with pg:
        try:
            facts = one(pg.execute(SERVER_FACTS))
        except psycopg.Error as exc:
            yield Check("connection", False, f"{conn.describe()}: {str(exc).strip()}")
            return
        (version, version_num, superuser, replication, read_all, wal_level, archive_mode, archive_command,
         in_recovery, data_directory, user, database, read_settings, may_switch) = facts
        role = _ident(user)
        yield Check("connection", True, f"{conn.describe()}: PostgreSQL {version}"
                    + (" (standby)" if in_recovery else ""))
        if method == "logical":
            yield Check("privileges", bool(superuser or read_all),
                        "superuser" if superuser else "member of pg_read_all_data" if read_all else
                        grant(f"GRANT pg_read_all_data TO {role};"))
        else:
            yield Check("privileges", bool(superuser or replication),
                        "REPLICATION" if replication else "superuser" if superuser else
                        grant(f"ALTER ROLE {role} REPLICATION;") + f"; pg_hba.conf also needs a "
                        f"`host replication {user} ...` line")
            yield Check("wal_level", wal_level in ("replica", "logical"), f"{wal_level}"
                        + ("" if wal_level in ("replica", "logical") else " (physical backups need replica)"))
            yield _engine_check(pg, options, role, database)
        major = version_num // 10000
        for tool in ("pg_dump", "pg_restore") if method == "logical" else ("pg_basebackup",):
            yield _tool_check(options, tool, major)
        if settings.archive_logs:
            unseen = None if superuser or read_settings else grant(f"GRANT pg_read_all_settings TO {role};")
            yield from _archive_checks(options, job, wal_level, archive_mode, archive_command, data_directory, unseen)
            if not (in_recovery or may_switch):
                yield Check("privileges: wal switch", False, "cannot call pg_switch_wal() to test archiving; "
                            + grant(f"GRANT EXECUTE ON FUNCTION pg_switch_wal() TO {role};",
                                    f"database {database}"))
            elif not in_recovery:
                yield _switch_check(wal_archive, pg, switch_timeout)


def _engine_check(pg: psycopg.Connection, options: PostgresOptions, role: str, database: str) -> Check:
    """Which physical engine backups use: the file engine (data_dir readable here) or pg_basebackup."""
    if reason := engine.unusable(options):
        return Check("physical engine", True, f"pg_basebackup (full backups only): {reason}", warning=True)
    system_id, may_start, may_stop = one(pg.execute(
        "SELECT (SELECT system_identifier FROM pg_control_system()), "
        "has_function_privilege('pg_backup_start(text, boolean)', 'EXECUTE'), "
        "has_function_privilege('pg_backup_stop(boolean)', 'EXECUTE')"))
    if reason := engine.unusable(options, system_id):
        return Check("physical engine", False, f"file engine: {reason}")
    if not (may_start and may_stop):
        return Check("physical engine", False, f"file engine (reads {options.data_dir}): " + grant(
            f"GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), pg_backup_stop(boolean) TO {role};",
            f"database {database}"))
    return Check("physical engine", True, f"file engine: reads {options.data_dir} with {engine.workers(options)} "
                 "workers; full, diff and incr backups")


def _tool_check(options: PostgresOptions, tool: str, server_major: int) -> Check:
    try:
        path = find_tool(tool, options.bin_dir, server_major)
        version = tool_version(path)
    except BackupdError as exc:
        return Check(tool, False, str(exc))
    tool_major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    ok = tool_major >= server_major
    return Check(tool, ok, f"{path} {version}" + ("" if ok else f": older than the server ({server_major})"))


def _archive_checks(options: PostgresOptions, job: str, wal_level: str, archive_mode: str, archive_command: str,
                    data_directory: str | None, unseen: str | None) -> Iterator[Check]:
    """``unseen``: why the server's data_directory could not be read (the missing grant), if so."""
    yield Check("wal_level", wal_level in ("replica", "logical"), wal_level)
    yield Check("archive_mode", archive_mode in ("on", "always"),
                archive_mode + ("" if archive_mode in ("on", "always") else ": set archive_mode = on (restart needed)"))
    calls = "wal-push" in archive_command and "backupd" in archive_command
    names_job = f"--job {job}" in archive_command or f"--job={job}" in archive_command
    detail = archive_command or "(empty)"
    if not calls:
        detail += f": expected `backupd --config CONFIG wal-push --job {job} %p`"
    elif not names_job:
        detail += f": no --job {job}; fine only while this is the one postgres job archiving WAL"
    yield Check("archive_command", calls, detail, warning=calls and not names_job)
    data_dir = options.data_dir
    if data_dir is None:
        yield Check("data_dir", False, "not set: the daemon cannot push WAL ahead of archive_command")
    elif not (Path(data_dir) / "pg_wal" / "archive_status").is_dir():
        yield Check("data_dir", False, f"{data_dir}: no pg_wal/archive_status in it (or not readable)")
    elif data_directory and Path(data_directory).resolve() != Path(data_dir).resolve():
        yield Check("data_dir", False, f"{data_dir}: the server's data_directory is {data_directory}")
    elif unseen:
        yield Check("data_dir", True, f"{data_dir}: not compared with the server's data_directory; {unseen}",
                    warning=True)
    else:
        yield Check("data_dir", True, str(data_dir))


def _switch_check(wal_archive: Callable[[], LogArchive], pg: psycopg.Connection, timeout: float) -> Check:
    try:
        pg.execute("SELECT txid_current()")  # some WAL, so the switch really closes a segment
        filename = one(pg.execute("SELECT pg_walfile_name(pg_switch_wal())"))[0]
    except psycopg.Error as exc:
        return Check("wal switch", False, f"pg_switch_wal() failed: {str(exc).strip()}")
    archive = wal_archive()
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if archive.exists(archive_name(filename)):
                return Check("wal switch", True,
                             f"{filename} arrived in storage after {time.monotonic() - started:.1f} s")
        except DriverError:
            pass
        time.sleep(0.2)
    return Check("wal switch", False, f"{filename} did not arrive in storage within {timeout:.0f} s; "
                 "check the server log for archive_command errors")
