"""``backupd check`` for a mysql job, and the measurements verification takes in a scratch server."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterator

import pymysql

from backupd.driver import Check
from backupd.errors import BackupdError
from backupd.manifest import Manifest
from backupd.usercheck import NO_ROW, Answer, judge
from drivers.mysql.client import Credentials, query, variable, version_of
from drivers.mysql.logical import base_tables, count_rows, server_info

if TYPE_CHECKING:
    from drivers.mysql.driver import MysqlDriver

DUMP_PRIVILEGES = ("SELECT", "RELOAD", "SHOW VIEW", "TRIGGER", "EVENT", "LOCK TABLES")
ARCHIVE_PRIVILEGES = ("REPLICATION SLAVE", ("BINLOG MONITOR", "REPLICATION CLIENT"))
PHYSICAL_PRIVILEGES = ("RELOAD", "PROCESS", ("BINLOG MONITOR", "REPLICATION CLIENT"))
MIN_BINLOG_RETENTION = 24 * 3600
_GRANT_RE = re.compile(r"^GRANT (.+?) ON \*\.\* TO ", re.I)


def global_privileges(conn: pymysql.connections.Connection) -> set[str]:
    granted: set[str] = set()
    for (line,) in query(conn, "SHOW GRANTS FOR CURRENT_USER()"):
        match = _GRANT_RE.match(str(line))
        if match:
            granted.update(p.strip().upper() for p in match[1].split(","))
    return granted


def _missing(granted: set[str], needed: tuple) -> list[str]:
    if "ALL PRIVILEGES" in granted or "ALL" in granted:
        return []
    missing = []
    for item in needed:
        options = item if isinstance(item, tuple) else (item,)
        if not any(option in granted for option in options):
            missing.append(" or ".join(options))
    return missing


def _retention_seconds(conn: pymysql.connections.Connection) -> float | None:
    for name, scale in (("binlog_expire_logs_seconds", 1), ("expire_logs_days", 86400)):
        value = variable(conn, name)
        if value not in (None, ""):
            seconds = float(value) * scale
            if seconds:
                return seconds
    return None  # 0 everywhere: binlogs are never purged automatically


def server_checks(driver: "MysqlDriver") -> Iterator[Check]:
    settings = driver.context.settings
    method = driver.default_method
    for kind, label in (("dump", "mysqldump"), ("client", "mysql client"), ("binlog", "mysqlbinlog")) + (
            (("backup", "mariadb-backup"), ("stream", "mbstream")) if method == "physical" else ()):
        try:
            yield Check(f"tool {label}", True, version_of(kind))
        except BackupdError as exc:
            yield Check(f"tool {label}", False, str(exc))
    credentials = driver.credentials
    try:
        conn = credentials.connect()
    except BackupdError as exc:
        yield Check("connection", False, str(exc))
        return
    try:
        info = server_info(conn)
        yield Check("connection", True, f"{credentials.endpoint}: {info.flavor} {info.version}")
        granted = global_privileges(conn)
        needed = DUMP_PRIVILEGES + (PHYSICAL_PRIVILEGES if method == "physical" else ())
        if settings.archive_logs:
            needed += ARCHIVE_PRIVILEGES
        missing = _missing(granted, needed)
        yield Check("privileges", not missing, f"missing global {', '.join(missing)}" if missing
                    else "dump" + (", physical" if method == "physical" else "")
                    + (", replication" if settings.archive_logs else "") + " privileges present")
        if settings.archive_logs or info.log_bin:
            yield Check("log_bin", info.log_bin, "ON" if info.log_bin else "OFF: binlog archiving and PITR need it")
        if info.log_bin:
            fmt = (info.binlog_format or "").upper()
            yield Check("binlog_format", True, fmt if fmt == "ROW" else f"{fmt}: ROW is recommended for exact replay",
                        warning=fmt != "ROW")
            yield Check("server_id", info.server_id > 0, str(info.server_id) if info.server_id
                        else "0: binlog streaming needs a non-zero server_id")
            if info.flavor == "mariadb":
                yield Check("gtid", True, f"gtid_binlog_pos={variable(conn, 'gtid_binlog_pos') or '(empty)'}")
            else:
                yield Check("gtid", True, f"gtid_mode={info.gtid_mode}", warning=(info.gtid_mode or "") != "ON")
            retention = _retention_seconds(conn)
            short = retention is not None and retention < MIN_BINLOG_RETENTION
            yield Check("binlog retention", True,
                        "binlogs are never purged automatically" if retention is None
                        else f"{retention / 3600:.1f}h" + (" (short: an archiver outage longer than this leaves a gap)"
                                                           if short else ""), warning=short)
        if settings.archive_logs and (driver.options.databases or driver.options.exclude_databases):
            yield Check("pitr scope", True, "the job dumps some databases but binlog replay applies the whole "
                        "server's changes: restore targets need the other databases too", warning=True)
        for name in driver.options.databases:
            present = bool(query(conn, "SHOW DATABASES LIKE %s", (name,)))
            yield Check(f"database {name}", present, "present" if present else "not found on the server")
    except pymysql.MySQLError as exc:
        yield Check("server", False, f"{credentials.endpoint}: {exc.args[-1]}")
    finally:
        conn.close()


def count_tables(credentials: Credentials, manifest: Manifest) -> dict[str, int]:
    """Row counts in the scratch server, for the tables of the backed-up databases."""
    conn = credentials.connect()
    try:
        databases = manifest.metadata.get("databases") or sorted({t.partition(".")[0] for t in manifest.row_counts})
        present = {row[0] for row in query(conn, "SHOW DATABASES")}
        tables = base_tables(conn, [db for db in databases if db in present]) if databases else []
        return count_rows(conn, tables)
    finally:
        conn.close()


def run_user_checks(credentials: Credentials, manifest: Manifest, checks: list[str]) -> list[Check]:
    """The job's ``verify.checks``: SQL returning true, run in the first backed-up database."""
    if not checks:
        return []
    databases = manifest.metadata.get("databases") or []
    conn = credentials.connect(database=databases[0] if databases else None)
    answers = []
    try:
        for sql in checks:
            try:
                rows = query(conn, sql)
                answers.append(Answer(sql, rows[0][0] if rows else NO_ROW))
            except pymysql.MySQLError as exc:
                answers.append(Answer(sql, error=f"error: {exc.args[-1]}"))
    finally:
        conn.close()
    return [judge(answer) for answer in answers]
