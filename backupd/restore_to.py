"""What ``restore --to`` may name, checked before anything is read or written.

A driver states what it restores to (DESIGN.md): a directory (PostgreSQL physical,
MySQL physical, Redis), a file (SQLite) or a URL of its own scheme (logical
restores). A ``--to`` of another kind is a usage error (exit 2) with one line
naming what the driver takes, never a directory named ``redis:`` or a file in
the current directory.
"""

from __future__ import annotations

import re
from pathlib import Path

from backupd.errors import UsageError
from backupd.redact import redact

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(to: str) -> bool:
    return bool(_URL_RE.match(to))


def _path(to: str, driver: str, takes: str) -> Path:
    if not to.strip():
        raise UsageError(f"--to is empty: the {driver} driver restores to {takes}")
    if is_url(to):
        raise UsageError(f"--to {redact(to)}: the {driver} driver restores to {takes}, not to a URL")
    if "\0" in to:
        raise UsageError(f"--to contains a NUL byte: the {driver} driver restores to {takes}")
    path = Path(to).expanduser().absolute()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"--to {to}: {ancestor} is not a directory")
    return path


def directory(to: str, driver: str, holds: str = "the restored files", takes: str | None = None) -> Path:
    """``--to`` as a directory (made if missing) that will hold ``holds``; ``takes`` words every kind the
    driver accepts, for messages."""
    takes = takes or f"a directory (that will hold {holds})"
    path = _path(to, driver, takes)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--to {to}: exists and is not a directory; the {driver} driver restores to {takes}")
    return path


def file(to: str, driver: str, what: str = "the database file") -> Path:
    """``--to`` as a file in an existing directory."""
    takes = f"a file path ({what})"
    path = _path(to, driver, takes)
    if path.is_dir():
        raise UsageError(f"--to {to}: is a directory; the {driver} driver restores to {takes}")
    if not path.parent.is_dir():
        raise UsageError(f"--to {to}: directory {path.parent} does not exist")
    return path


def url(to: str, driver: str, schemes: tuple[str, ...], takes: str | None = None) -> str:
    """``--to`` as a URL of one of ``schemes``; ``takes`` words every kind the driver accepts, for messages."""
    takes = takes or "a " + " or ".join(f"{s}://" for s in schemes) + " URL"
    if not to.strip():
        raise UsageError(f"--to is empty: the {driver} driver restores to {takes}")
    scheme = to.partition("://")[0].lower() if is_url(to) else ""
    if scheme not in schemes:
        raise UsageError(f"--to {redact(to)}: the {driver} driver restores to {takes}")
    return to
