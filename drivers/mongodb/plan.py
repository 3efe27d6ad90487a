"""Point-in-time restore plans: which dump, which oplog slices, where replay stops."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Sequence

import bson
from bson import Timestamp

from backupd.driver import LogReach
from backupd.errors import DriverError
from backupd.gaps import past_gap
from backupd.logarchive import LogObject
from backupd.manifest import Manifest
from backupd.timeutil import format_timestamp
from drivers.mongodb.oplog import Slice, chain, contiguous, find_gaps, key, ts_datetime, ts_from_text, ts_text


@dataclass
class RestorePlan:
    manifest: Manifest
    replay_dump_oplog: bool
    since: Timestamp | None  # the dump is consistent here; slices replay entries after it
    slices: list[Slice] = field(default_factory=list)
    limit: Timestamp | None = None  # --oplogLimit (exclusive); None: every archived entry
    namespaces: list[str] = field(default_factory=list)  # "db.collection" or "db.*"; empty: everything
    note: str | None = None  # what the plan changed knowingly (--to-gap)

    @property
    def filter_dump_oplog(self) -> bool:
        """A partial restore of an --oplog dump: mongorestore refuses --oplogReplay with --nsInclude, so backupd
        replays the dump's own oplog entries for these namespaces itself, with the slices."""
        return bool(self.manifest.metadata.get("oplog")) and bool(self.namespaces)

    @property
    def replays(self) -> bool:
        return bool(self.slices) or self.filter_dump_oplog

    @property
    def oplog_limit(self) -> str | None:
        return f"{self.limit.time}:{self.limit.inc}" if self.limit else None

    def describe(self, to: str) -> list[str]:
        manifest = self.manifest
        consistent = manifest.metadata.get("consistent_at", format_timestamp(manifest.finished_at))
        only = f" (only {', '.join(self.namespaces)})" if self.namespaces else ""
        lines = [f"restore backup {manifest.backup_id} (mongodump archive, consistent at {consistent}) to {to}{only}",
                 "  mongorestore --archive" + (" --oplogReplay" if self.replay_dump_oplog else "")
                 + "".join(f" --nsInclude={ns}" for ns in self.namespaces)]
        if self.filter_dump_oplog:
            lines.append(f"then replay the dump's own oplog entries for {', '.join(self.namespaces)} (filtered by "
                         "backupd: mongorestore refuses --oplogReplay with --nsInclude)")
        if self.slices:
            upto = (f"--oplogLimit={self.oplog_limit} ({format_timestamp(ts_datetime(self.limit))})"
                    if self.limit else "the newest archived entry")
            lines.append(f"then replay {len(self.slices)} oplog slice(s) up to {upto}:")
            lines.extend(f"  oplog/{piece.name}" for piece in self.slices)
        else:
            lines.append("no oplog slices to replay")
        if self.note:
            lines.append(self.note)
        return lines


def target_limit(target: dt.datetime) -> Timestamp:
    """Oplog timestamps have one-second resolution: the target's whole second is included."""
    return Timestamp(int(target.timestamp()) + 1, 0)


def reach(manifest: Manifest, slices: list[Slice]) -> LogReach | None:
    """How far replay from this dump goes: the end of the last slice before the first gap."""
    since_text = manifest.metadata.get("oplog_from")
    if not since_text:
        return None
    since = ts_from_text(since_text)
    run = contiguous(slices, since)
    gaps = find_gaps(slices, since)
    newest = run[-1].last if run else since
    return LogReach(last_log=run[-1].name if run else None, until=ts_datetime(newest),
                    first_missing=gaps[0] if gaps else None, missing=tuple(gaps))


def extend(recorded: LogReach, checkpoint: str, tail: Iterable[LogObject]) -> LogReach | None:
    """``recorded`` (unbroken, as a full listing found it) carried over the slices named from ``checkpoint`` on
    (names sort as the slices chain): the slices that follow its last one without a break. None when its last
    slice is not the checkpoint (it did not end there)."""
    last = Slice.parse(recorded.last_log) if recorded.last_log else None
    if last is None or recorded.last_log != checkpoint:
        return None
    after = sorted((s for s in (Slice.parse(obj.name) for obj in tail) if s is not None and s != last),
                   key=lambda s: (key(s.first), key(s.last)))
    if not after:
        return recorded
    gaps = find_gaps([last, *after])
    run = contiguous(after, last.last)
    end = run[-1] if run else last
    return LogReach(last_log=end.name, until=ts_datetime(end.last), first_missing=gaps[0] if gaps else None,
                    missing=tuple(gaps))


def make_plan(manifest: Manifest, slices: list[Slice], target: dt.datetime | None,
              namespaces: Sequence[str] = (), to_gap: bool = False) -> RestorePlan:
    meta = manifest.metadata
    since = ts_from_text(meta["oplog_from"]) if meta.get("oplog_from") else None
    databases = meta.get("databases")
    if not namespaces and isinstance(databases, list):  # the job's databases filter applies on restore
        namespaces = [f"{db}.*" for db in databases]
    plan = RestorePlan(manifest, bool(meta.get("oplog")) and not namespaces, since, namespaces=list(namespaces))
    if since is None:
        if target is not None and slices:
            raise DriverError(f"backup {manifest.backup_id} records no oplog position; it cannot be rolled forward")
        return plan
    limit = target_limit(target) if target is not None else None
    needed = chain(slices, since, limit)
    gaps = find_gaps(needed, since) if needed else []
    if gaps:
        run = contiguous(needed, since)
        reachable = ts_datetime(run[-1].last if run else since)
        if not to_gap:
            what = f"target {format_timestamp(target)}" if target is not None else "the newest state"
            raise past_gap(what, "oplog", gaps[0],
                           f"reachable from backup {manifest.backup_id} up to {format_timestamp(reachable)}")
        needed, limit, target = run, None, None
        plan.note = (f"--to-gap: the archived oplog has a gap ({gaps[0]}); replay stops before it, at "
                     f"{format_timestamp(reachable)} (later writes are not restored)")
    if target is not None:
        newest = needed[-1].last if needed else since
        if key(newest) < key(Timestamp(int(target.timestamp()), 0)):
            raise DriverError(f"target {format_timestamp(target)} is after the newest archived oplog entry "
                              f"({format_timestamp(ts_datetime(newest))}); the repository cannot reach it",
                              hint="is the oplog archiver running? (archive_logs = true and `backupd run`)")
    plan.slices = needed
    plan.limit = limit
    return plan


def wanted(entry: bson.raw_bson.RawBSONDocument, namespaces: Sequence[str]) -> bool:
    """Whether an oplog entry touches one of ``namespaces`` ("db.collection" or "db.*"; none: all).

    A command entry (``db.$cmd``) counts for the collection its command names (``{create: "orders"}``)."""
    if not namespaces:
        return True
    ns = str(entry.get("ns", ""))
    db, _, coll = ns.partition(".")
    if coll == "$cmd":
        command = entry.get("o")
        first = next(iter(command.values()), None) if command is not None else None
        coll = first if isinstance(first, str) else ""
    return any(pattern in (f"{db}.*", f"{db}.{coll}") for pattern in namespaces)


def narrowed(entry: bson.raw_bson.RawBSONDocument, namespaces: Sequence[str]) -> bytes | None:
    """The entry's BSON if it touches ``namespaces``; a transaction (``applyOps``) keeps only its operations that do."""
    command = entry.get("o") if entry.get("op") == "c" else None
    inner = command.get("applyOps") if command is not None else None
    if not namespaces or inner is None:
        return bytes(entry.raw) if wanted(entry, namespaces) else None
    doc = bson.decode(entry.raw)
    ops = [op for op in doc["o"]["applyOps"]
           if wanted(bson.raw_bson.RawBSONDocument(bson.encode(op)), namespaces)]
    if not ops:
        return None
    doc["o"]["applyOps"] = ops
    return bson.encode(doc)


def write_oplog(plan: RestorePlan, open_slice: Callable[[str], BinaryIO], dest: Path,
                dump_oplog: BinaryIO | None = None) -> int:
    """One oplog.bson for mongorestore --oplogReplay: the dump's own entries (when given), then the planned
    slices' entries after ``since``; only those in the plan's namespaces."""
    since = key(plan.since) if plan.since else (0, 0)
    raw_codec = bson.CodecOptions(document_class=bson.raw_bson.RawBSONDocument)
    written = 0
    with open(dest, "wb") as out:
        if dump_oplog is not None:
            for raw in bson.decode_file_iter(dump_oplog, codec_options=raw_codec):
                if (data := narrowed(raw, plan.namespaces)) is not None:
                    out.write(data)
                    written += 1
        for piece in plan.slices:
            with open_slice(piece.name) as stream:
                for raw in bson.decode_file_iter(stream, codec_options=raw_codec):
                    if key(raw["ts"]) <= since or (data := narrowed(raw, plan.namespaces)) is None:
                        continue
                    out.write(data)
                    written += 1
    return written


__all__ = ["RestorePlan", "make_plan", "target_limit", "write_oplog", "ts_text"]
