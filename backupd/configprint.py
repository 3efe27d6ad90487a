"""A fingerprint of the configuration a process runs with: the file's path and bytes and every
``BACKUPD_*`` override in its environment.

``backupd backup`` hands the backup to the running daemon only when the two
fingerprints match, so the daemon never runs a job as an older version of the
file, or without an override the command was given. Import-light: the command
computes it before loading anything else.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, TypeVar

T = TypeVar("T")

CONFIG_VARIABLE = "BACKUPD_CONFIG"  # names the file, which the fingerprint covers already


def fingerprint(path: str | os.PathLike[str]) -> str | None:
    """None when the file cannot be read: nothing is handed over then."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    digest = hashlib.sha256(os.path.abspath(path).encode() + b"\0" + data)
    for key in sorted(os.environ):
        if key.upper().startswith("BACKUPD_") and key.upper() != CONFIG_VARIABLE:
            digest.update(f"\0{key}={os.environ[key]}".encode())
    return digest.hexdigest()


def stable_fingerprint(path: str | os.PathLike[str], load: Callable[[], T]) -> tuple[T, str | None]:
    """``load()``'s result and the fingerprint of what it loaded: None if the file changed meanwhile."""
    before = fingerprint(path)
    loaded = load()
    return loaded, before if before is not None and fingerprint(path) == before else None
