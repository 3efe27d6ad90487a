"""Pinned backups: kept by retention whatever the policy says.

A pin is an object in the repository, ``<job>/pins/<backup_id>``, so pins
survive the loss of the host that made them and every host prunes alike.
"""

from __future__ import annotations

import contextlib
import io
import json

from backupd.errors import ObjectNotFound
from backupd.repository import Layout
from backupd.storage import Storage
from backupd.timeutil import format_timestamp, utcnow


class Pins:
    def __init__(self, storage: Storage, job: str) -> None:
        self.storage = storage
        self.job = job
        self.layout = Layout(job)

    def key(self, backup_id: str) -> str:
        return self.layout.pin_key(backup_id)

    def pin(self, backup_id: str, note: str = "") -> None:
        record = {"backup_id": backup_id, "pinned_at": format_timestamp(utcnow()), "note": note}
        self.storage.put(self.key(backup_id), io.BytesIO(json.dumps(record).encode() + b"\n"))

    def unpin(self, backup_id: str) -> bool:
        """Remove the pin; False when the backup was not pinned."""
        if not self.is_pinned(backup_id):
            return False
        self.storage.delete(self.key(backup_id))
        return True

    def is_pinned(self, backup_id: str) -> bool:
        with contextlib.suppress(ObjectNotFound):
            self.storage.stat(self.key(backup_id))
            return True
        return False

    def ids(self) -> set[str]:
        ids = (self.layout.pinned_id(info.key) for info in self.storage.list(self.layout.pins_prefix))
        return {backup_id for backup_id in ids if backup_id is not None}
