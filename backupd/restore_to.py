"""What ``restore --to`` may name, checked before anything is read or written.

A driver states what it restores to (DESIGN.md): a directory (PostgreSQL physical,
MySQL physical, Redis), a file (SQLite) or a URL of its own scheme (logical
restores). A ``--to`` of another kind is a usage error (exit 2) with one line
naming what the driver takes, never a directory named ``redis:`` or a file in
the current directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from backupd.errors import UsageError
from backupd.redact import redact
from backupd.whoami import current_user

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(to: str) -> bool:
    return bool(_URL_RE.match(to))


def _path(to: str, driver: str, takes: str, writes_into: bool) -> Path:
    """``to`` as an absolute path whose nearest existing directory (the path itself when ``writes_into``
    and it exists, else above it) is a directory this process may write in."""
    if not to.strip():
        raise UsageError(f"--to is empty: the {driver} driver restores to {takes}")
    if is_url(to):
        raise UsageError(f"--to {redact(to)}: the {driver} driver restores to {takes}, not to a URL")
    if "\0" in to:
        raise UsageError(f"--to contains a NUL byte: the {driver} driver restores to {takes}")
    path = Path(to).expanduser().absolute()
    ancestor = path if writes_into and path.is_dir() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"--to {to}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--to {to}: directory {ancestor} is not writable by {current_user()}")
    return path


def directory(to: str, driver: str, holds: str = "the restored files", takes: str | None = None) -> Path:
    """``--to`` as a directory (made if missing) that will hold ``holds``; ``takes`` words every kind the
    driver accepts, for messages."""
    takes = takes or f"a directory (that will hold {holds})"
    path = _path(to, driver, takes, writes_into=True)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--to {to}: exists and is not a directory; the {driver} driver restores to {takes}")
    return path


def file(to: str, driver: str, what: str = "the database file") -> Path:
    """``--to`` as a file in an existing directory."""
    takes = f"a file path ({what})"
    path = _path(to, driver, takes, writes_into=False)
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
