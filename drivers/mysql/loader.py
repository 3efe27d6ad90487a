"""Loading a dump through several client connections, plain secondary indexes built after the data.

One *main* client (the ``mariadb`` command-line client) runs the dump as
written, except the row data: the INSERT statements of a table go in turn, each
whole, to N *data* clients, server connections driven from Python (each its
own server thread; drivers.mysql.dataclient), so statement parsing and row
inserts run in parallel, as myloader and mysqlsh's loadDump do. A data client
runs again a statement that InnoDB rolled back as a deadlock victim or after a
lock wait timeout, which concurrent inserts into one table can meet; a client
that stops at such an error could not. Order is kept with barriers: a table's
data is sent only once the main client has run everything before it (its
CREATE TABLE), and nothing after the data (ENABLE KEYS, triggers, the next
table) runs before every data client has committed it. The main client's
barrier is a ``SELECT`` of a random marker that it prints; a data client's is
its queue drained and its last statement done. A table whose data is one
statement is loaded by the main client alone, without barriers, and so is every
table that is not InnoDB (table locks would serialise the clients) or has a
FULLTEXT or SPATIAL index.

Plain ``KEY`` indexes of InnoDB tables are taken out of CREATE TABLE and added
by one ALTER TABLE after the table's data, in their order: InnoDB then builds
each by sorting instead of inserting every entry at random into a B-tree
larger than the buffer pool. Unique, fulltext and spatial keys stay inline, as
do all keys of a table with system versioning or foreign keys, or that a
foreign key in an earlier table references (it may need one of them; a table
referenced later has its keys back by then), and any key led by an
AUTO_INCREMENT column.

The dump's header (its ``SET`` statements: character set, time zone, sql_mode,
unique and foreign key checks off; not its lines that are no statement, such as
newer mariadb-dump's sandbox-mode command for the client) is replayed in every
data client, which also gets ``USE`` for the table's database. Each statement
commits on its own (autocommit), as in the dump: batching several per
transaction made concurrent inserts into one table wait on each other's locks,
and a deadlock victim could not be run again alone. ``LOCK TABLES``/``UNLOCK TABLES`` around
the data are dropped: they would lock the data clients out (they only speed up
MyISAM loads).
"""

from __future__ import annotations

import re
import secrets
import threading
from typing import Iterable, Sequence

from backupd.errors import DriverError
from backupd.tool import PIPE, Tool
from drivers.mysql.client import Credentials, check_content
from drivers.mysql.dataclient import DataClient
from drivers.mysql.dumpsyntax import (DATA_HEADER, DATA_STATEMENT, DATABASE_HEADER, NAME, OTHER_SECTION, STRUCTURE_HEADER,
                                      quote, unquote)

_PLAIN_KEY = re.compile(rb"^  KEY " + NAME + rb" \(" + NAME)
_AUTO_INCREMENT = re.compile(rb"^  " + NAME + rb" .* AUTO_INCREMENT\b")
_REFERENCES = re.compile(rb" REFERENCES (?:" + NAME + rb"\.)?" + NAME)
_CHARSET_CLIENT = b"/*!40101 SET character_set_client = "


class _MainClient:
    """The ``mariadb`` client fed through stdin; its stdout is watched for barrier markers."""

    def __init__(self, argv: Sequence[str], marker: bytes) -> None:
        self.tool = Tool(argv, stdin=PIPE, stdout=PIPE)
        self._marker = marker
        self._seen: set[bytes] = set()
        self._eof = False
        self._cond = threading.Condition()
        self._drain = threading.Thread(target=self._read, name="mysql-client-out", daemon=True)
        self._drain.start()

    def _read(self) -> None:
        try:
            for line in self.tool.stdout:
                if line.startswith(self._marker):
                    with self._cond:
                        self._seen.add(line.strip())
                        self._cond.notify_all()
        except (OSError, ValueError):
            pass
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def send(self, data: bytes) -> None:
        self.tool.stdin.write(data)

    def sync(self, n: int) -> None:
        mark = self._marker + str(n).encode()
        self.send(b"SELECT '" + mark + b"';\n")
        self.tool.stdin.flush()
        with self._cond:
            self._cond.wait_for(lambda: mark in self._seen or self._eof)
            if mark not in self._seen:
                raise BrokenPipeError("the client exited")

    def finish(self) -> None:
        self.tool.stdin.close()
        self._drain.join()


class ParallelLoad:
    """Feed ``feed()`` the dump in order, then ``finish()``; ``close()`` always."""

    def __init__(self, argv: Sequence[str], credentials: Credentials, workers: int) -> None:
        self._credentials = credentials
        self._marker = b"backupd-sync-" + secrets.token_hex(8).encode() + b"-"
        self._syncs = 0
        self.main = _MainClient(argv, self._marker)
        self._size = max(1, workers)
        self._workers: list[DataClient] = []
        self._next = 0
        self._preamble: list[bytes] = []
        self._line = bytearray()
        self._database: bytes | None = None
        self._section: tuple[str, bytes] | None = None
        self._delimited = False
        self._create: list[bytes] | None = None
        self._charset_line = b""
        self._referenced: set[tuple[bytes | None, bytes]] = set()  # tables earlier foreign keys point to
        self._parallel_tables: set[tuple[bytes | None, bytes]] = set()  # InnoDB, no FULLTEXT/SPATIAL index
        self._pending_alters: list[tuple[tuple[bytes | None, bytes], bytes]] = []  # ((db, table), ALTER)
        self._held: bytearray | None = None  # a table's first data statement, kept for the main client
        self._parallel = False  # the current table's data is going to the data clients
        self._target: DataClient | None = None  # where the current statement goes once whole (None: held)
        self._statement_bytes = bytearray()  # the current statement's, for self._target
        self._in_statement = False
        self._semicolon = False
        self.sent = 0

    # ---- the stream ---------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.sent += len(data)
        pos, size = 0, len(data)
        while pos < size:
            if self._in_statement:
                pos = self._statement(data, pos)
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                self._line += data[pos:]
                if self._starts_statement(self._line):
                    self._begin(bytes(self._line))
                    self._line.clear()
                return
            self._line += data[pos:end + 1]
            pos = end + 1
            line = bytes(self._line)
            self._line.clear()
            if self._starts_statement(line):
                self._begin(line[:-1])
                pos -= 1  # the newline ends the header line (or the statement): read it as statement bytes
            else:
                self._other(line)

    def finish(self) -> None:
        if self._line:
            self._other(bytes(self._line))
            self._line.clear()
        self._flush_held()
        self._end_data()
        self._alters()
        for worker in self._workers:
            worker.finish()
        self.main.finish()
        check_content(self.main.tool, "loading the dump")

    def close(self) -> None:
        try:
            for worker in self._workers:
                worker.close()
        finally:
            self.main.tool.close()

    def check_after_broken_pipe(self) -> None:
        """The main client died: wait for it, and raise naming its error."""
        try:
            self.main.tool.stdin.close()
        except OSError:
            pass
        check_content(self.main.tool, "loading the dump")
        raise DriverError("the mysql client stopped reading the dump")

    def _starts_statement(self, line: bytes | bytearray) -> bool:
        return (not self._delimited and self._section is not None and self._section[0] == "data"
                and len(line) >= 8 and line.startswith(DATA_STATEMENT))

    # ---- data statements ----------------------------------------------------------------

    def _begin(self, first: bytes) -> None:
        """A data statement starts: the table's first is held, the rest go to the data clients."""
        self._semicolon = first.endswith(b";")
        self._in_statement = True
        if self._held is None and not self._parallel:
            self._held = bytearray(first)
            return
        if self._section is None or (self._database, self._section[1]) not in self._parallel_tables:
            self._flush_held()  # keep this table's data on the main client
            self._held = bytearray(first)
            return
        self._to_workers()
        self._target = self._worker()
        self._statement_bytes[:] = first

    def _statement(self, data: bytes, pos: int) -> int:
        """Statement bytes up to and including the first ';\\n' (values never hold a raw newline)."""
        if self._semicolon and data.startswith(b"\n", pos):
            self._put(b"\n")
            self._statement_done()
            return pos + 1
        end = data.find(b";\n", pos)
        stop = len(data) if end < 0 else end + 2
        self._put(data[pos:stop])
        if end < 0:
            self._semicolon = data.endswith(b";")
            return stop
        self._statement_done()
        return stop

    def _put(self, data: bytes) -> None:
        if self._target is not None:
            self._statement_bytes += data
        else:
            assert self._held is not None
            self._held += data

    def _statement_done(self) -> None:
        self._semicolon = self._in_statement = False
        if self._target is not None:
            self._target.put(bytes(self._statement_bytes))
            self._statement_bytes.clear()
        self._target = None

    def _to_workers(self) -> None:
        """The table has more than one statement: sync the main client, hand its held statement on."""
        if self._parallel:
            return
        self._syncs += 1
        self.main.sync(self._syncs)
        self._parallel = True
        if self._held is not None:
            held, self._held = self._held, None
            self._worker().put(bytes(held))

    def _worker(self) -> DataClient:
        if len(self._workers) < self._size:
            self._workers.append(DataClient(self._credentials, self._preamble, len(self._workers) + 1))
        client = self._workers[self._next % len(self._workers)]
        self._next += 1
        if client.database != self._database and self._database is not None:
            client.put(b"USE " + quote(self._database))
            client.database = self._database
        return client

    def _flush_held(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self.main.send(bytes(held))

    def _end_data(self) -> None:
        """Nothing after a table's data may run before every data client has committed it."""
        if self._parallel:
            for worker in self._workers:
                worker.sync()
            self._parallel = False

    # ---- everything else goes to the main client ----------------------------------------

    def _other(self, line: bytes) -> None:
        if self._held is not None or self._parallel:
            if self._section and self._section[0] == "data" and (
                    line.startswith(b"LOCK TABLES ") or line.rstrip() == b"UNLOCK TABLES;"):
                return  # would lock the data clients out
            self._flush_held()
            self._end_data()
        if self._delimited:
            self.main.send(line)
            if line.rstrip() == b"DELIMITER ;":
                self._delimited = False
            return
        if self._create is not None:
            self._create.append(line)
            if line.rstrip().endswith(b";"):
                self._emit_create()
            return
        if line.startswith(b"--"):
            self._comment(line)
        elif line.rstrip() == b"DELIMITER ;;":
            self._delimited = True
        elif self._section is not None and self._section[0] == "structure":
            if line.startswith(b"CREATE TABLE "):
                self._create = [line]
                if line.rstrip().endswith(b";"):
                    self._emit_create()
                return
            if line.startswith(_CHARSET_CLIENT):
                self._charset_line = line
        elif self._section is not None and self._section[0] == "data" and (
                line.startswith(b"LOCK TABLES ") or line.rstrip() == b"UNLOCK TABLES;"):
            return
        elif self._section is None and self._database is None and line.startswith((b"/*!", b"/*M!")):
            if line.rstrip().endswith(b";"):  # not the sandbox-mode line, a command to the mariadb client
                self._preamble.append(line)  # the header's SET statements, replayed in each data client
        self.main.send(line)

    def _comment(self, line: bytes) -> None:
        """Section headers; a table's deferred ALTER runs at the first header after its data."""
        if match := DATA_HEADER.match(line):
            if self._pending_alters and self._pending_alters[-1][0] != (self._database, unquote(match[1])):
                self._alters()
            self._section = ("data", unquote(match[1]))
            return
        if match := DATABASE_HEADER.match(line):
            self._alters()
            self._database, self._section = unquote(match[1]), None
        elif match := STRUCTURE_HEADER.match(line):
            self._alters()
            self._section = ("structure", unquote(match[1]))
            self._charset_line = b""
        elif line.startswith(OTHER_SECTION):
            self._alters()
            self._section = None

    def _emit_create(self) -> None:
        assert self._create is not None and self._section is not None
        lines, self._create = self._create, None
        statement = b"".join(lines)
        table_key = (self._database, self._section[1])
        for match in _REFERENCES.finditer(statement):
            self._referenced.add((unquote(match[1]) if match[1] else self._database, unquote(match[2])))
        keep, keys = defer_keys(lines, allowed=table_key not in self._referenced)
        if self._database is not None and parallel_safe(lines):
            self._parallel_tables.add(table_key)
        self.main.send(b"".join(keep))
        if keys and self._database is not None:
            table = quote(self._database) + b"." + quote(self._section[1])
            alter = b"ALTER TABLE " + table + b" " + b", ".join(b"ADD " + key for key in keys) + b";\n"
            if self._charset_line:
                alter = (b"SET @backupd_cs = @@character_set_client;\n" + self._charset_line + alter
                         + b"SET character_set_client = @backupd_cs;\n")
            self._pending_alters.append(((self._database, self._section[1]), alter))

    def _alters(self) -> None:
        if self._pending_alters:
            self.main.send(b"".join(alter for _, alter in self._pending_alters))
            self._pending_alters.clear()


def parallel_safe(lines: list[bytes]) -> bool:
    """Whether concurrent INSERTs help this table: InnoDB (row locks), no FULLTEXT or SPATIAL index."""
    closing = next((i for i, line in enumerate(lines) if line.startswith(b")")), len(lines))
    if b"ENGINE=InnoDB" not in b"".join(lines[closing:]):
        return False
    return not any(line.startswith((b"  FULLTEXT KEY ", b"  SPATIAL KEY ")) for line in lines[1:closing])


def defer_keys(lines: list[bytes], allowed: bool = True) -> tuple[list[bytes], list[bytes]]:
    """CREATE TABLE lines without their deferrable plain KEYs, and those keys' definitions."""
    closing = next((i for i, line in enumerate(lines) if line.startswith(b")")), None)
    if not allowed or closing is None:
        return lines, []
    statement = b"".join(lines)
    tail = b"".join(lines[closing:])
    if b" FOREIGN KEY " in statement or b"WITH SYSTEM VERSIONING" in tail or b"ENGINE=InnoDB" not in tail:
        return lines, []
    auto = {unquote(m[1]) for line in lines[1:closing] if (m := _AUTO_INCREMENT.match(line))}
    keep: list[bytes] = []
    keys: list[bytes] = []
    for line in lines[1:closing]:
        match = _PLAIN_KEY.match(line)
        if match and unquote(match[2]) not in auto:
            keys.append(line.strip().rstrip(b","))
        else:
            keep.append(line)
    if not keys:
        return lines, []
    if keep and keep[-1].rstrip().endswith(b","):
        keep[-1] = keep[-1].rstrip()[:-1] + b"\n"
    return [lines[0], *keep, *lines[closing:]], keys


def load_parallel(argv: Sequence[str], credentials: Credentials, data: Iterable[bytes], workers: int) -> int:
    """Load a dump's chunks (main client ``argv``, data clients as ``credentials``); return bytes sent.

    Raises ContentRejected naming the client and the server's error number.
    """
    loader = ParallelLoad(argv, credentials, workers)
    try:
        try:
            for chunk in data:
                loader.feed(chunk)
            loader.finish()
        except BrokenPipeError:
            loader.check_after_broken_pipe()
    finally:
        loader.close()
    return loader.sent
