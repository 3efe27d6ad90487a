"""Exact per-table row counts read from the dump stream itself, as it passes.

mariadb-dump (MariaDB since MDEV-25152) writes each row of an extended INSERT
on a line of its own::

    INSERT INTO `t` VALUES
    (1,'a'),
    (2,'b');

The dump never writes a raw newline inside a value (it escapes it as ``\\n``),
so within such a statement every row starts a line with ``(`` and the
statement ends at the first ``;\\n``: ``bytes.count`` finds both at memory
speed, which is cheaper than a second ``SELECT COUNT(*)`` scan on the server
and counts exactly the rows the dump holds. Statements whose rows share a
line (MySQL's mysqldump, ``--skip-extended-insert``) cannot be counted
without a full SQL lexer: the counter then turns ``exact`` off and the caller
counts in SQL instead.

Only the dump's own data sections are read (``-- Dumping data for table``
outside ``DELIMITER ;;`` blocks), so INSERTs inside triggers, routines and
events are never mistaken for data.
"""

from __future__ import annotations

from typing import Callable

from drivers.mysql.dumpsyntax import (DATA_HEADER, DATA_STATEMENT, DATABASE_HEADER, OTHER_SECTION, STRUCTURE_HEADER,
                                      quote, unquote)

#: How much of a line outside value lists is kept to classify it (a header is short).
LINE_HEAD = 64 * 1024


def _name(raw: bytes) -> str:
    return unquote(raw).decode("utf-8", errors="surrogateescape")


def _quoted(name: str) -> bytes:
    return quote(name.encode("utf-8", errors="surrogateescape"))


class RowCounter:
    """Feed it the dump's bytes in order; ``counts`` is {"db.table": rows} while ``exact`` holds."""

    def __init__(self, on_inexact: Callable[[str], None] | None = None) -> None:
        self.counts: dict[str, int] = {}
        self.exact = True
        self.why = ""
        self._on_inexact = on_inexact
        self._head = bytearray()  # the first LINE_HEAD bytes of the unfinished line
        self._database: str | None = None
        self._section: tuple[str, str] | None = None  # ("structure" | "data", table)
        self._delimited = False  # inside DELIMITER ;; (triggers, routines, events)
        self._rows_of: str | None = None  # "db.table" whose value list is being read
        self._newline = False  # rows: the previous chunk ended with a newline
        self._semicolon = False  # rows: the previous chunk ended with ';'

    def feed(self, data: bytes) -> None:
        pos, size = 0, len(data)
        while pos < size and self.exact:
            if self._rows_of is not None:
                pos = self._rows(data, pos)
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                self._keep(data, pos, size)
                return
            self._keep(data, pos, end + 1)
            pos = end + 1
            line = bytes(self._head)
            self._head.clear()
            self._line(line)

    def finish(self) -> None:
        """The stream ended: a value list still open means the counts are not whole."""
        if self._rows_of is not None:
            self.give_up(f"the dump ended inside the data of {self._rows_of}")

    def give_up(self, why: str) -> None:
        if self.exact:
            self.exact, self.why = False, why
            if self._on_inexact is not None:
                self._on_inexact(why)

    def _keep(self, data: bytes, start: int, stop: int) -> None:
        room = LINE_HEAD - len(self._head)
        if room > 0:
            self._head += data[start:min(stop, start + room)]

    def _rows(self, data: bytes, pos: int) -> int:
        """Inside a value list: one row per line until the statement's ``;\\n``."""
        assert self._rows_of is not None
        if self._semicolon and data.startswith(b"\n", pos):
            self._rows_of, self._semicolon = None, False
            return pos + 1
        end = data.find(b";\n", pos)
        stop = len(data) if end < 0 else end
        rows = data.count(b"\n(", pos, stop)
        if self._newline and data.startswith(b"(", pos):
            rows += 1
        self.counts[self._rows_of] += rows
        if end < 0:
            self._newline = data.endswith(b"\n")
            self._semicolon = data.endswith(b";")
            return stop
        self._rows_of, self._newline, self._semicolon = None, False, False
        return end + 2

    def _line(self, line: bytes) -> None:
        if self._delimited:
            if line.rstrip() == b"DELIMITER ;":
                self._delimited = False
            return
        if line.startswith(b"--"):
            self._comment(line)
            return
        if line.rstrip() == b"DELIMITER ;;":
            self._delimited = True
            return
        if self._section is None or self._database is None:
            return
        kind, table = self._section
        key = f"{self._database}.{table}"
        if kind == "structure" and line.startswith(b"CREATE TABLE "):
            self.counts.setdefault(key, 0)
        elif kind == "data" and line.startswith(DATA_STATEMENT):
            if len(line) >= LINE_HEAD or not line.rstrip().endswith(b" VALUES"):
                self.give_up(f"the rows of {key} share a line (not one row per line)")
            elif b" INTO " + _quoted(table) + b" " not in line:
                self.give_up(f"unexpected statement in the data of {key}")
            else:
                self.counts.setdefault(key, 0)
                self._rows_of, self._newline, self._semicolon = key, True, False

    def _comment(self, line: bytes) -> None:
        if match := DATABASE_HEADER.match(line):
            self._database, self._section = _name(match[1]), None
        elif match := STRUCTURE_HEADER.match(line):
            self._section = ("structure", _name(match[1]))
        elif match := DATA_HEADER.match(line):
            self._section = ("data", _name(match[1]))
        elif line.startswith(OTHER_SECTION):
            self._section = None
