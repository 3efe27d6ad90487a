"""What SQLite verification runs inside the sandbox: integrity check, row counts, the user's checks.

The restored file comes from the repository and may be hostile (a crafted
file, triggers, views), so backupd never opens it itself: it runs this file's
source with Debian's ``/usr/bin/python3 -I`` in ``backupd.sandbox`` (the
scratch copy the only file it can see or write) and reads one JSON document
from its stdout. Standard library only, no imports from backupd: the sandbox
sees /usr, not backupd's virtual environment. ATTACH (and so ``VACUUM INTO``'s
second file) is refused by an authorizer as well.

stdin: ``{"path": "...", "checks": ["SQL", ...]}``; stdout:
``{"integrity": ["ok"], "counts": {"table": n}, "checks": [[sql, value, error], ...]}`` (``value``: the
first column of the first row, ``{"no_row": true}`` when there is none; ``error``: null when it ran; backupd
judges them) or ``{"error": "..."}`` when the file is not a database SQLite can read.
"""

import json
import sqlite3
import sys

MAX_PROBLEMS = 10
SHOWN = 200  # characters of a failing check's value or error kept (it is restored content)
DENIED = {sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH}


def _authorize(action: int, *_: object) -> int:
    return sqlite3.SQLITE_DENY if action in DENIED else sqlite3.SQLITE_OK


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _short(text: str) -> str:
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


NO_ROW = {"no_row": True}


def _value(value: object) -> object:
    """A column's value as JSON carries it: a blob as its text, long text cut short."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return _short(value) if isinstance(value, str) else value


def probe(path: str, checks: list) -> dict:
    try:
        db = sqlite3.connect(f"file:{path}", uri=True, isolation_level=None)
        db.set_authorizer(_authorize)
        db.execute("PRAGMA trusted_schema = OFF")
        problems = [_short(str(row[0])) for row in db.execute(f"PRAGMA integrity_check({MAX_PROBLEMS})")]
        tables = [row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        counts = {table: db.execute(f"SELECT count(*) FROM {_quote(table)}").fetchone()[0] for table in tables}
    except sqlite3.Error as exc:
        return {"error": str(exc)}
    results = []
    for sql in checks:
        try:
            row = db.execute(sql).fetchone()
            results.append([sql, _value(row[0]) if row else NO_ROW, None])
        except sqlite3.Error as exc:
            results.append([sql, None, _short(f"error: {exc}")])
    db.close()
    return {"integrity": problems, "counts": counts, "checks": results}


if __name__ == "__main__":
    request = json.load(sys.stdin)
    json.dump(probe(request["path"], request["checks"]), sys.stdout)
