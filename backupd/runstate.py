"""The outcome of a job's newest backup run, so pruning can stop after a failure.

``run_backup`` records every run's result in ``state_dir/runs/<job>.json``
(written even when storage is what failed). A failure is also recorded in the
repository, ``<job>/state/last-failure.json``, readable from any host (its error
text sealed: ``backupd.sealed``), and the next successful run removes it, so a
healthy repository holds no extra object.
Retention reads both and trusts the more recent record.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import structlog

from backupd import sealed
from backupd.errors import BackupdError, ObjectNotFound
from backupd.redact import redact
from backupd.repository import Layout
from backupd.storage import Storage
from backupd.timeutil import format_timestamp, parse_timestamp

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RunRecord:
    result: str  # "success" | "failure"
    at: dt.datetime
    backup_id: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"result": self.result, "at": format_timestamp(self.at), "backup_id": self.backup_id,
                "error": self.error}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode() + b"\n"

    def to_stored(self, recipients: Sequence[object]) -> bytes:
        """The repository's copy: the error (it may quote the database's own words) sealed to the recipients."""
        document = self.to_dict()
        if document["error"] is None:
            del document["error"]
        return json.dumps(sealed.seal_fields(document, ("error",), recipients)).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> "RunRecord":
        data = json.loads(raw)
        if data.get("result") not in ("success", "failure"):
            raise ValueError(f"unknown result {data.get('result')!r}")
        return cls(data["result"], parse_timestamp(data["at"]), data.get("backup_id"), data.get("error"))


def repository_key(job: str) -> str:
    return Layout(job).failure_key()


def local_path(state_dir: Path, job: str) -> Path:
    return state_dir / "runs" / f"{job}.json"


def record_run(storage: Storage, state_dir: Path, job: str, record: RunRecord, recipients: Sequence[object]) -> None:
    """Best effort in both places: a failure to record never hides the run's own outcome.

    The local record (state_dir, 0600) keeps the error in the clear; the repository's has it sealed.
    """
    if record.error:
        record = RunRecord(record.result, record.at, record.backup_id, redact(record.error)[:500])
    try:
        path = local_path(state_dir, job)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(record.to_json())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not record the run locally", job=job, error=str(exc))
    try:
        if record.result == "failure":
            storage.put(repository_key(job), io.BytesIO(record.to_stored(recipients)))
        else:
            storage.delete(repository_key(job))
    except BackupdError as exc:
        log.warning("could not record the run in the repository", job=job, error=str(exc))


class UnreadableRecord(Exception):
    pass


def last_run(storage: Storage, state_dir: Path, job: str) -> RunRecord | None:
    """The more recent of the two records; raises UnreadableRecord when one is damaged."""
    records = []
    raw: bytes | None = None
    with contextlib.suppress(FileNotFoundError):
        raw = local_path(state_dir, job).read_bytes()
    if raw is not None:
        records.append(_parse(raw, str(local_path(state_dir, job))))
    try:
        with contextlib.closing(storage.open(repository_key(job))) as handle:
            records.append(_parse(handle.read(), repository_key(job)))
    except ObjectNotFound:
        pass
    return max(records, key=lambda r: r.at) if records else None


def _parse(raw: bytes, where: str) -> RunRecord:
    try:
        return RunRecord.from_json(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise UnreadableRecord(f"{where}: unreadable run record ({exc})") from None


def pause_reason(record: RunRecord | None, newest_backup_start: dt.datetime | None) -> str | None:
    """Why pruning must wait, or None: the newest run failed and no backup started after it."""
    if record is None or record.result != "failure":
        return None
    if newest_backup_start is not None and newest_backup_start > record.at:
        return None
    error = f": {record.error}" if record.error else ""
    return f"the newest backup run failed at {format_timestamp(record.at)}{error}"
