"""This host's private copies of its committed backups' file maps (``<backup id>.json``, 0600 in a 0700
directory under the state directory): a host holding only public keys plans the next diff or incr from
them. A copy counts only when it matches the sha256 and size the backup's signed manifest records."""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from backupd.manifest import Manifest
from backupd.paths import file_maps_dir
from drivers.postgres.filemap import matches, stream_facts

log = structlog.get_logger(__name__)

SUFFIX = ".json"


class MapStore:
    def __init__(self, state_dir: Path, job: str) -> None:
        self.directory = file_maps_dir(state_dir, job)

    def path(self, backup_id: str) -> Path:
        return self.directory / f"{backup_id}{SUFFIX}"

    def write(self, backup_id: str, data: bytes) -> None:
        """Atomically, after the backup's manifest is committed."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        temporary = self.directory / f".{backup_id}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        os.replace(temporary, self.path(backup_id))

    def read(self, manifest: Manifest) -> bytes | None:
        """The kept map of ``manifest``'s backup; None when there is none, or it does not match the manifest."""
        facts = stream_facts(manifest)
        path = self.path(manifest.backup_id)
        if facts is None:
            return None
        try:
            if path.stat().st_size != facts[1]:
                log.warning("local file map does not match its manifest; not using it", path=str(path))
                return None
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("local file map unreadable; not using it", path=str(path), error=str(exc))
            return None
        if not matches(manifest, data):
            log.warning("local file map does not match its manifest's sha256; not using it", path=str(path))
            return None
        return data

    def prune(self, keep: set[str]) -> int:
        """Remove the maps of backups not in ``keep`` (deleted by prune or retention); how many were removed."""
        removed = 0
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return 0
        for name in names:
            backup_id = name[:-len(SUFFIX)] if name.endswith(SUFFIX) else None
            if name.startswith(".") and name.endswith(".tmp") or backup_id is not None and backup_id not in keep:
                (self.directory / name).unlink(missing_ok=True)
                removed += 1
        return removed
