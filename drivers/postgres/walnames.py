"""WAL file names, LSNs, timelines and archive continuity: pure functions, no I/O.

Archive names follow DESIGN.md: ``<timeline>/<file>``, e.g.
``00000001/000000010000000000000003`` or ``00000002/00000002.history``. In the repository a
segment (and its ``.partial``) lies in the folder of its first 16 hex digits (timeline and
logical log id: 256 segments of 16 MiB), ``<timeline>/<segment[0:16]>/<segment>``; history and
``.backup`` label files lie beside those folders (``WAL_NAMING``, the seam ``backupd.lognaming``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from backupd.lognaming import LogNaming

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024

SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
FILE_RE = re.compile(
    r"^(?:(?P<segment>[0-9A-F]{24})(?:\.partial|\.[0-9A-F]{8}\.backup)?|(?P<history>[0-9A-F]{8})\.history)$"
)
LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")


PLAIN_RE = re.compile(r"^[0-9A-F]{24}(?:\.partial)?$")
HISTORY_RE = re.compile(r"^[0-9A-F]{8}\.history$")


def is_segment(name: str) -> bool:
    return bool(SEGMENT_RE.match(name))


def is_history(name: str) -> bool:
    return bool(HISTORY_RE.match(name))


def segment_folder(filename: str) -> str | None:
    """The repository folder of a segment or .partial file: its timeline and logical log id; None for others."""
    return filename[:16] if PLAIN_RE.match(filename) else None


def kept_always(name: str) -> str | None:
    """Recovery onto a timeline needs its history file: retention never deletes one."""
    return "timeline history" if name.endswith(".history") else None


#: PostgreSQL's WAL in the repository: 256 segments a folder; names sort in archive order across timelines.
WAL_NAMING = LogNaming("wal", folder=segment_folder, ordered_across=True, always_keep=kept_always)


def is_wal_file(name: str) -> bool:
    return bool(FILE_RE.match(name))


def timeline_of(filename: str) -> str:
    """The 8-hex-digit timeline a WAL, .partial, .backup or .history file belongs to."""
    match = FILE_RE.match(filename)
    if not match:
        raise ValueError(f"{filename!r} is not a WAL segment, .partial, .backup or .history file name")
    return (match["segment"] or match["history"])[:8]


def archive_name(filename: str) -> str:
    return f"{timeline_of(filename)}/{filename}"


def parse_lsn(text: str) -> int:
    if not LSN_RE.match(text.strip()):
        raise ValueError(f"not a PostgreSQL LSN like 0/3000028: {text!r}")
    high, low = text.strip().split("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def segments_per_id(segment_size: int) -> int:
    return 0x100000000 // segment_size


def segment_name(timeline: int, segno: int, segment_size: int) -> str:
    per = segments_per_id(segment_size)
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"


def segno_of_lsn(lsn: int, segment_size: int) -> int:
    return lsn // segment_size


def parse_segment(name: str, segment_size: int) -> tuple[int, int]:
    """(timeline, segment number) of a plain segment name."""
    if not SEGMENT_RE.match(name):
        raise ValueError(f"{name!r} is not a WAL segment name")
    return int(name[:8], 16), int(name[8:16], 16) * segments_per_id(segment_size) + int(name[16:], 16)


def next_names(name: str, count: int, segment_size: int) -> list[str]:
    """The ``count`` segments after ``name`` on its timeline (for prefetching)."""
    if not SEGMENT_RE.match(name):
        return []
    tli, segno = parse_segment(name, segment_size)
    return [segment_name(tli, segno + i, segment_size) for i in range(1, count + 1)]


@dataclass(frozen=True)
class Switch:
    """One line of a timeline history file: ``parent`` ended at ``lsn``, where the next timeline begins."""

    parent: int
    lsn: int


def parse_history(text: str) -> list[Switch]:
    switches = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 2:
            raise ValueError(f"malformed timeline history line: {line!r}")
        switches.append(Switch(int(parts[0]), parse_lsn(parts[1])))
    return switches


def timeline_path(start_tli: int, histories: dict[int, list[Switch]], start_lsn: int = 0) -> tuple[int, list[Switch]]:
    """The newest timeline branching off ``start_tli`` after ``start_lsn``, and the switches leading to it."""
    for tli in sorted(histories, reverse=True):
        switches = histories[tli]
        parents = [s.parent for s in switches]
        if tli > start_tli and start_tli in parents and switches[parents.index(start_tli)].lsn >= start_lsn:
            return tli, switches[parents.index(start_tli):]
    return start_tli, []


def expected_segments(start_tli: int, start_segno: int, histories: dict[int, list[Switch]],
                      last_segno: dict[int, int], segment_size: int) -> list[str]:
    """Every segment replay needs from ``start_segno`` on ``start_tli`` to the newest archived one.

    Each timeline in the path contributes its segments up to the one before the
    switch (the segment holding the switch point is read from the child
    timeline); the last timeline up to its highest archived segment.
    """
    newest, switches = timeline_path(start_tli, histories, start_segno * segment_size)
    names: list[str] = []
    segno = start_segno
    tli = start_tli
    for index, switch in enumerate(switches):
        end = segno_of_lsn(switch.lsn, segment_size)
        names.extend(segment_name(tli, n, segment_size) for n in range(segno, end))
        segno = end
        tli = switches[index + 1].parent if index + 1 < len(switches) else newest
    final = last_segno.get(tli)
    if final is not None:
        names.extend(segment_name(tli, n, segment_size) for n in range(segno, final + 1))
    return names


def missing_segments(start_tli: int, start_segno: int, archived: Iterable[str],
                     histories: dict[int, list[Switch]], segment_size: int) -> list[str]:
    """Segments replay from the start needs that the archive lacks (a gap breaks PITR past it)."""
    present: set[str] = set()
    last: dict[int, int] = {}
    for name in archived:
        if SEGMENT_RE.match(name):
            present.add(name)
            tli, segno = parse_segment(name, segment_size)
            last[tli] = max(last.get(tli, segno), segno)
    return [name for name in expected_segments(start_tli, start_segno, histories, last, segment_size)
            if name not in present]
