"""Oplog slices for PITR: naming, continuity, and the archiver that tails local.oplog.rs.

A slice holds the oplog entries with ``from < ts <= to``, concatenated as BSON,
and is named ``<from>-<to>.bson`` with each timestamp written
``SSSSSSSSSS.IIIIIIIIII`` (seconds and increment, zero-padded), so names sort
in oplog order. Slices chain: each one's ``from`` is the previous one's
``to``. When the tailer resumes it must find the previous ``to`` entry still in
the oplog; if the oplog rolled over first, the entries in between are lost:
that is a gap, counted in ``backupd_archive_gaps_total``, and the new chain
starts at the oldest entry still there (its ``from`` then differs from the
previous ``to``, so continuity checks find the gap too).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

from bson import Timestamp

from backupd import pushes
from backupd.served_metrics import served
from backupd.logarchive import LogArchive
from backupd.timeutil import UTC

SLICE_RE = re.compile(r"^(\d{10})\.(\d{10})-(\d{10})\.(\d{10})\.bson$")
MAX_INC = 0xFFFFFFFF


def ts_text(ts: Timestamp) -> str:
    return f"{ts.time:010d}.{ts.inc:010d}"


def ts_from_text(text: str) -> Timestamp:
    seconds, _, inc = text.partition(".")
    return Timestamp(int(seconds), int(inc))


def ts_datetime(ts: Timestamp) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts.time, UTC)


def ts_before(ts: Timestamp) -> Timestamp:
    """The greatest timestamp below ``ts``: an exclusive lower bound that still admits ``ts``."""
    if ts.inc > 0:
        return Timestamp(ts.time, ts.inc - 1)
    return Timestamp(ts.time - 1, MAX_INC)


def key(ts: Timestamp) -> tuple[int, int]:
    return ts.time, ts.inc


@dataclass(frozen=True)
class Slice:
    first: Timestamp  # exclusive lower bound ("from")
    last: Timestamp  # inclusive upper bound ("to")

    @property
    def name(self) -> str:
        return f"{ts_text(self.first)}-{ts_text(self.last)}.bson"

    @classmethod
    def parse(cls, name: str) -> "Slice | None":
        match = SLICE_RE.match(name)
        if not match:
            return None
        a, b, c, d = (int(g) for g in match.groups())
        return cls(Timestamp(a, b), Timestamp(c, d))


def list_slices(archive: LogArchive) -> list[Slice]:
    slices = [s for s in (Slice.parse(name) for name in archive.iter_names()) if s is not None]
    return sorted(slices, key=lambda s: (key(s.first), key(s.last)))


def find_gaps(slices: list[Slice], since: Timestamp | None = None) -> list[str]:
    """Breaks in the chain (one message each), from the slice covering ``since`` onwards."""
    ordered = [s for s in slices if since is None or key(s.last) > key(since)]
    gaps = []
    if since is not None and ordered and key(ordered[0].first) > key(since):
        gaps.append(f"missing oplog from {ts_text(since)} to {ts_text(ordered[0].first)} "
                    f"(before slice {ordered[0].name})")
    for prev, nxt in zip(ordered, ordered[1:]):
        if key(nxt.first) != key(prev.last):
            if key(nxt.first) > key(prev.last):
                gaps.append(f"missing oplog from {ts_text(prev.last)} to {ts_text(nxt.first)} "
                            f"(between slices {prev.name} and {nxt.name})")
            else:
                gaps.append(f"overlapping oplog slices {prev.name} and {nxt.name}")
    return gaps


def contiguous(slices: list[Slice], since: Timestamp) -> list[Slice]:
    """The slices replay from ``since`` can use in order: up to the first break in the chain."""
    run: list[Slice] = []
    for piece in slices:
        if key(piece.last) <= key(since):
            continue
        edge = run[-1].last if run else since
        if key(piece.first) > key(edge):
            break
        run.append(piece)
    return run


def chain(slices: list[Slice], since: Timestamp, until: Timestamp | None) -> list[Slice]:
    """The contiguous slices holding every entry after ``since`` up to ``until`` (None: all)."""
    needed = []
    for s in slices:
        if key(s.last) <= key(since):
            continue
        if until is not None and key(s.first) >= key(until):
            break
        needed.append(s)
    return needed


# ---- the archiver ------------------------------------------------------------------------


class OplogEntry(Protocol):
    """A raw oplog document: its BSON bytes and its ``ts``."""

    raw: bytes

    def __getitem__(self, name: str) -> object: ...


class OplogSource(Protocol):
    def oldest(self) -> Timestamp | None: ...

    def tail(self, since: Timestamp, stop: threading.Event) -> Iterator[OplogEntry | None]:
        """Entries with ``ts >= since`` in order; yields None when idle (so the caller can cut a slice)."""


class Gap(Exception):
    """The oplog no longer holds the entry the chain continues from."""


class OplogArchiver:
    """Tails the oplog and ships a slice every ``interval`` seconds (or ``max_bytes``), resuming after restarts."""

    def __init__(self, job: str, archive: LogArchive, source: OplogSource, spool: Path, *,
                 interval: float = 60.0, max_bytes: int = 64 << 20, start: Callable[[], Timestamp | None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic, log: object = None) -> None:
        self.name = f"oplog:{job}"
        self.job = job
        self.archive = archive
        self.source = source
        self.spool = spool
        self.interval = interval
        self.max_bytes = max_bytes
        self.start = start
        self.clock = clock
        self.log = log
        self.gaps = 0

    def resume_point(self) -> tuple[Timestamp, bool]:
        """(exclusive lower bound, whether its entry must still be in the oplog)."""
        slices = list_slices(self.archive)
        if slices:
            return slices[-1].last, True
        start = self.start()
        oldest = self.source.oldest()
        if start is not None and (oldest is None or key(oldest) <= key(start)):
            return start, True
        if oldest is None:
            raise Gap("the oplog is empty")
        return ts_before(oldest), False

    def run(self, stop: threading.Event) -> None:
        since, anchored = self.resume_point()
        entries = iter(self.source.tail(since, stop))
        carried: list[OplogEntry] = []
        if anchored:
            since, carried = self._check_anchor(since, entries)
        self._ship(since, itertools.chain(carried, entries), stop)

    def _check_anchor(self, since: Timestamp, entries: Iterator[OplogEntry | None]
                      ) -> tuple[Timestamp, list[OplogEntry]]:
        """The first entry must be the one the chain continues from; else count a gap and start anew."""
        for entry in entries:
            if entry is None:
                continue
            ts = _ts(entry)
            if key(ts) == key(since):
                return since, []
            self.gaps += 1
            if metrics := served():
                metrics.ARCHIVE_GAPS.labels(self.job).inc()
            self._warn("oplog gap: the oplog rolled over before it was archived; PITR cannot cross it",
                       expected=ts_text(since), oldest=ts_text(ts))
            return ts_before(ts), [entry]
        return since, []

    def _ship(self, since: Timestamp, entries: Iterator[OplogEntry | None], stop: threading.Event) -> None:
        batch = _Batch(self.spool)
        deadline = self.clock() + self.interval
        try:
            for entry in entries:
                if entry is not None:
                    batch.add(entry)
                    if batch.count == 1:
                        deadline = self.clock() + self.interval
                lag = time.time() - batch.first.time if batch.count else 0.0
                if metrics := served():
                    metrics.ARCHIVE_LAG.labels(self.job).set(max(0.0, lag))
                if batch.count and (self.clock() >= deadline or batch.size >= self.max_bytes):
                    since = self._push(since, batch)
                    batch = _Batch(self.spool)
                if stop.is_set():
                    break
            if batch.count:  # stopping: ship what we have, so nothing read is lost
                self._push(since, batch)
        finally:
            batch.discard()

    def _push(self, since: Timestamp, batch: "_Batch") -> Timestamp:
        piece = Slice(since, batch.last)
        batch.close()
        try:
            self.archive.push_file(piece.name, batch.path)
        except Exception as exc:
            pushes.failed(self.job, exc)
            raise
        pushes.succeeded(self.job)
        if metrics := served():
            metrics.ARCHIVE_LAG.labels(self.job).set(0)
        self._info("oplog slice archived", slice=piece.name, entries=batch.count, bytes=batch.size)
        return piece.last

    def _warn(self, message: str, **fields: object) -> None:
        if self.log is not None:
            self.log.warning(message, job=self.job, **fields)  # type: ignore[attr-defined]

    def _info(self, message: str, **fields: object) -> None:
        if self.log is not None:
            self.log.info(message, job=self.job, **fields)  # type: ignore[attr-defined]


def _ts(entry: OplogEntry) -> Timestamp:
    ts = entry["ts"]
    if not isinstance(ts, Timestamp):
        raise ValueError(f"oplog entry without a BSON timestamp: {ts!r}")
    return ts


class _Batch:
    """Entries collected for one slice, in a spool file."""

    def __init__(self, spool: Path) -> None:
        self.path = spool / f".oplog-{uuid.uuid4().hex[:12]}.bson"
        self._out = open(self.path, "wb")
        self.count = 0
        self.size = 0
        self.first: Timestamp = Timestamp(0, 0)
        self.last: Timestamp = Timestamp(0, 0)

    def add(self, entry: OplogEntry) -> None:
        self._out.write(entry.raw)
        self.count += 1
        self.size += len(entry.raw)
        ts = _ts(entry)
        if self.count == 1:
            self.first = ts
        self.last = ts

    def close(self) -> None:
        if not self._out.closed:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()

    def discard(self) -> None:
        if not self._out.closed:
            self._out.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
