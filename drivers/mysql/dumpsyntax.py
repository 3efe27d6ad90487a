"""The lines of a mariadb-dump/mysqldump file that the stream readers key on.

Shared by the row counter (drivers.mysql.rowcount) and the parallel loader
(drivers.mysql.loader), which must agree on where a table's data starts and ends.
"""

from __future__ import annotations

import re

NAME = rb"`((?:[^`]|``)*)`"
DATABASE_HEADER = re.compile(rb"^-- Current Database: " + NAME + rb"\s*$")
STRUCTURE_HEADER = re.compile(rb"^-- Table structure for table " + NAME + rb"\s*$")
DATA_HEADER = re.compile(rb"^-- Dumping data for table " + NAME + rb"\s*$")
#: Headers of every other section (routines, events, views): the table before them has ended.
OTHER_SECTION = (b"-- Dumping ", b"-- Temporary ", b"-- Final view")
DATA_STATEMENT = (b"INSERT ", b"REPLACE ")


def unquote(raw: bytes) -> bytes:
    """A name as matched inside backticks, its doubled backticks undone."""
    return raw.replace(b"``", b"`")


def quote(name: bytes) -> bytes:
    return b"`" + name.replace(b"`", b"``") + b"`"
