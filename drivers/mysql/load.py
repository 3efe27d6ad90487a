"""Loading a dump into a server through the client, whole or for chosen tables."""

from __future__ import annotations

import os
import re
from typing import BinaryIO, Iterable, Iterator

import pymysql

from backupd.errors import DriverError
from drivers.mysql.client import Credentials, query, quote_ident, tool_path
from drivers.mysql.dumpsyntax import NAME
from drivers.mysql.loader import load_parallel

COPY_CHUNK = 1 << 20
#: Data clients of a dump load: one server thread each (see drivers.mysql.loader).
MAX_LOAD_WORKERS = 4
_DATABASE = re.compile(rb"^-- Current Database: " + NAME)
_TABLE = re.compile(rb"^-- (?:Table structure for table|Dumping data for table|Temporary table structure for view"
                    rb"|Final view structure for view) " + NAME)
_OTHER = re.compile(rb"^-- Dumping (?:events|routines) for database ")
_FOOTER = b"/*!40103 SET TIME_ZONE=@OLD_TIME_ZONE */"


def _name(raw: bytes) -> str:
    return raw.replace(b"``", b"`").decode()


def parse_table(text: str, known: Iterable[str]) -> tuple[str, str]:
    """``db.table`` from --table, checked against the tables the backup holds."""
    db, dot, table = text.partition(".")
    if not dot or not db or not table:
        raise DriverError(f"--table {text}: expected DATABASE.TABLE")
    if text not in set(known):
        raise DriverError(f"--table {text}: the backup has no such table")
    return db, table


def filter_dump(stream: BinaryIO, tables: set[tuple[str, str]]) -> Iterator[bytes]:
    """The dump's header and footer, plus only the sections of ``tables`` (and their databases)."""
    databases = {db for db, _ in tables}
    keep, database, footer = True, None, False
    for line in _lines(stream):
        if not footer and line.startswith(b"-- "):
            if match := _DATABASE.match(line):
                database = _name(match[1])
                keep = database in databases
            elif match := _TABLE.match(line):
                keep = (database, _name(match[1])) in tables
            elif _OTHER.match(line):
                keep = False
        elif line.startswith(_FOOTER):
            footer = keep = True
        if keep:
            yield line


def _lines(stream: BinaryIO) -> Iterator[bytes]:
    rest = b""
    while chunk := stream.read(COPY_CHUNK):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(COPY_CHUNK):
        yield chunk


def client_argv(defaults_file: str, *extra: str) -> list[str]:
    """The client that runs backup content (a dump, mysqlbinlog's output) against a server.

    That content may be hostile, and the client runs on this host as backupd: ``--binary-mode``
    turns off its own commands (``\\!`` runs a shell, ``tee`` and ``pager`` write files; only
    ``DELIMITER`` and ``\\C`` remain), and ``--local-infile=0`` keeps ``LOAD DATA LOCAL INFILE``
    from sending it a file of this host.
    """
    return [tool_path("client"), f"--defaults-extra-file={defaults_file}", "--binary-mode", "--local-infile=0",
            "--max-allowed-packet=1G", *extra]


def load_dump(credentials: Credentials, defaults_file: str, stream: BinaryIO, tables: set[tuple[str, str]],
              workers: int | None = None) -> int:
    """The dump (or only ``tables``) into the server: data in parallel, plain indexes after the data.

    The main client is the command-line client with ``defaults_file``; the data clients connect
    with ``credentials`` (the same server and account).
    """
    data = _batched(filter_dump(stream, tables)) if tables else _chunks(stream)
    if workers is None:
        workers = max(1, min(os.cpu_count() or 1, MAX_LOAD_WORKERS))
    argv = client_argv(defaults_file, "--batch", "--skip-column-names", "--unbuffered")
    return load_parallel(argv, credentials, data, workers)


def _batched(lines: Iterable[bytes]) -> Iterator[bytes]:
    batch: list[bytes] = []
    size = 0
    for line in lines:
        batch.append(line)
        size += len(line)
        if size >= COPY_CHUNK:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)


def prepare_target(credentials: Credentials, databases: list[str], tables: set[tuple[str, str]],
                   *, force: bool, clean: bool) -> None:
    """Refuse to overwrite data unless asked; with ``clean`` drop what the restore replaces."""
    try:
        conn = credentials.connect()
    except DriverError as exc:
        raise DriverError(f"restore target: {exc}", hint=exc.hint) from None
    try:
        existing = set()
        if tables:
            for db, table in sorted(tables):
                if query(conn, "SELECT 1 FROM information_schema.tables WHERE table_schema=%s AND table_name=%s",
                         (db, table)):
                    existing.add(f"{db}.{table}")
        else:
            for db in databases:
                if query(conn, "SELECT 1 FROM information_schema.tables WHERE table_schema=%s LIMIT 1", (db,)):
                    existing.add(db)
        if existing and not (force or clean):
            raise DriverError(f"{credentials.endpoint}: {', '.join(sorted(existing))} already exist(s) with data; "
                              f"refusing to overwrite", hint="pass --clean to drop them first, or --force to load over them")
        if clean:
            for name in sorted(existing):
                db, _, table = name.partition(".")
                target = f"{quote_ident(db)}.{quote_ident(table)}" if table else quote_ident(db)
                query(conn, f"DROP {'TABLE' if table else 'DATABASE'} {target}")
    except pymysql.MySQLError as exc:
        raise DriverError(f"{credentials.endpoint}: {exc.args[-1]}") from None
    finally:
        conn.close()
