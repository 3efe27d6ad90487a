"""A test double: a tiny key-value "database" with a change log, for core tests of PITR.

``KvStore`` is the database: a JSON file of keys, a clock the test sets, and
pending changes that ``rotate()`` closes into a numbered log file (like a WAL
segment switch). ``KvlogDriver`` backs it up as one stream, records where its
logs begin (``metadata.pitr``), restores a backup and replays archived logs up
to a target time, and reports gaps in the archived sequence. It is honest:
a missing log makes restore and ``log_reach`` fail, naming the file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import itertools
import json
from pathlib import Path

from backupd import plugins
from backupd.descriptor import INCREMENTAL_BACKUP, DriverDescriptor
from backupd.driver import (BackupResult, BackupSource, Check, Driver, DriverOptions, IncrementalBackup, LogReach,
                            RestoreRequest, StreamSink, VerifyOutcome)
from backupd.errors import DriverError
from backupd.manifest import Manifest, PitrStart
from backupd.timeutil import format_timestamp, parse_timestamp

KIND = "oplog"


def log_name(seq: int) -> str:
    return f"{seq:010d}"


class KvStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        if not (path / "state.json").exists():
            self._save({"data": {}, "seq": 1, "pending": [], "now": "2026-01-01T00:00:00Z"})

    def _load(self) -> dict:
        return json.loads((self.path / "state.json").read_text())

    def _save(self, state: dict) -> None:
        (self.path / "state.json").write_text(json.dumps(state))

    @property
    def now(self) -> dt.datetime:
        return parse_timestamp(self._load()["now"])

    @now.setter
    def now(self, value: dt.datetime) -> None:
        state = self._load()
        state["now"] = format_timestamp(value)
        self._save(state)

    def set(self, key: str, value: str) -> None:
        state = self._load()
        state["data"][key] = value
        state["pending"].append({"at": state["now"], "key": key, "value": value})
        self._save(state)

    def rotate(self) -> tuple[str, Path]:
        """Close the current log into ``logs/<seq>``; return its name and file to archive."""
        state = self._load()
        name = log_name(state["seq"])
        out = self.path / "logs" / name
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(state["pending"]))
        state["seq"] += 1
        state["pending"] = []
        self._save(state)
        return name, out

    def snapshot(self) -> dict:
        state = self._load()
        return {"data": state["data"], "at": state["now"], "first_log": log_name(state["seq"])}


class KvlogOptions(DriverOptions):
    path: Path


class KvlogDriver(Driver):
    methods = ("logical",)
    options_model = KvlogOptions

    @property
    def store(self) -> KvStore:
        return KvStore(self.options.path)

    def backup(self, method: str, sink: StreamSink) -> BackupResult:
        snap = self.store.snapshot()
        sink("data", io.BytesIO(json.dumps(snap).encode()))
        return BackupResult(
            pitr=PitrStart(KIND, snap["first_log"], parse_timestamp(snap["at"])),
            row_counts={"keys": len(snap["data"])},
        )

    def _snapshot(self, source: BackupSource) -> dict:
        with source.open("data") as stream:
            return json.loads(stream.read())

    def _replay(self, source: BackupSource, target: dt.datetime | None) -> dict:
        snap = self._snapshot(source)
        data, since = snap["data"], parse_timestamp(snap["at"])
        expected = int(snap["first_log"])
        for obj in source.logs(KIND).list():
            if obj.name < snap["first_log"]:
                continue
            if int(obj.name) != expected:
                raise DriverError(f"cannot replay past missing oplog slice {log_name(expected)}")
            expected += 1
            with source.open_log(KIND, obj.name) as stream:
                for change in json.loads(stream.read()):
                    at = parse_timestamp(change["at"])
                    if since < at and (target is None or at <= target):  # older changes are in the snapshot
                        data[change["key"]] = change["value"]
        return data

    def restore(self, source: BackupSource, request: RestoreRequest) -> str:
        target = request.target.time if request.target else None
        data = self._replay(source, target)
        Path(request.to).write_text(json.dumps(data, sort_keys=True))
        return f"restored {len(data)} keys to {request.to}"

    def verify(self, source: BackupSource, scratch: Path, checks: list[str]) -> VerifyOutcome:
        snap = self._snapshot(source)
        return VerifyOutcome(row_counts={"keys": len(snap["data"])}, checks=[Check(c, True) for c in checks])

    def log_reach(self, source: BackupSource) -> LogReach | None:
        start = PitrStart.from_manifest(source.manifest)
        assert start is not None
        first = start.first_log
        objects = {int(obj.name): obj for obj in source.logs(KIND).list() if obj.name >= first}
        if not objects:
            return LogReach()
        missing = [log_name(seq) for seq in range(int(first), max(objects) + 1) if seq not in objects]
        usable = [objects[seq] for seq in range(int(first), max(objects) + 1) if seq in objects]
        usable = usable[:len(usable) if not missing else int(missing[0]) - int(first)]
        last = usable[-1] if usable else None
        return LogReach(last_log=last.name if last else None, until=last.modified if last else None,
                        first_missing=missing[0] if missing else None,
                        missing=tuple(f"missing oplog slice {name}" for name in missing))

    def extend_reach(self, manifest: Manifest, recorded: LogReach, checkpoint: str, tail) -> LogReach | None:
        if recorded.last_log is None or checkpoint > recorded.last_log:
            return None
        last = int(recorded.last_log)
        objects = {int(obj.name): obj for obj in tail if obj.name.isdigit() and int(obj.name) > last}
        numbers = range(last + 1, max(objects, default=last) + 1)
        missing = [log_name(seq) for seq in numbers if seq not in objects]
        run = list(itertools.takewhile(lambda seq: seq in objects, numbers))
        end = objects[run[-1]] if run else None
        return LogReach(last_log=end.name if end else recorded.last_log, until=end.modified if end else recorded.until,
                        first_missing=missing[0] if missing else None,
                        missing=tuple(f"missing oplog slice {name}" for name in missing))

    def check(self):
        return [Check("store", self.options.path.is_dir(), str(self.options.path))]


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


class KvincrDriver(KvlogDriver, IncrementalBackup):
    """KvlogDriver with diff and incr backups (method physical): an incremental stores the keys whose value
    differs from its parent's (each backup records a digest per key), and restores apply the chain in order."""

    methods = ("physical",)
    capabilities = frozenset({INCREMENTAL_BACKUP})

    def backup(self, method: str, sink: StreamSink) -> BackupResult:
        result = super().backup(method, sink)
        result.metadata["digests"] = {k: _digest(v) for k, v in self.store.snapshot()["data"].items()}
        return result

    def backup_incremental(self, method: str, sink: StreamSink, backup_type: str,
                           chain: list[Manifest]) -> BackupResult:
        assert chain[0].backup_type == "full" and backup_type in ("diff", "incr")
        parent = chain[-1].metadata["digests"]
        snap = self.store.snapshot()
        digests = {k: _digest(v) for k, v in snap["data"].items()}
        changed = {k: v for k, v in snap["data"].items() if parent.get(k) != digests[k]}
        sink("data", io.BytesIO(json.dumps({**snap, "data": changed}).encode()))
        return BackupResult(metadata={"digests": digests, "type": "forged", "parent": "forged"},
                            pitr=PitrStart(KIND, snap["first_log"], parse_timestamp(snap["at"])),
                            row_counts={"keys": len(snap["data"])})

    def _snapshot(self, source: BackupSource) -> dict:
        data: dict = {}
        snap: dict = {}
        for manifest in source.chain:
            with source.open_from(manifest.backup_id, "data") as stream:
                snap = json.loads(stream.read())
            data.update(snap["data"])
        return {**snap, "data": data}


def install(monkeypatch) -> None:
    """Make driver = "kvlog" (and "kvincr") resolvable for in-process tests (config validation and contexts)."""
    original = plugins.driver_descriptor

    def driver_descriptor(name: str):
        if name == "kvincr":
            return DriverDescriptor.of("kvincr", KvincrDriver)
        return DriverDescriptor.of("kvlog", KvlogDriver) if name == "kvlog" else original(name)

    monkeypatch.setattr(plugins, "driver_descriptor", driver_descriptor)
