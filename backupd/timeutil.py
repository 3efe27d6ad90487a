"""Durations, RFC 3339 timestamps and backup ids."""

from __future__ import annotations

import datetime as dt
import itertools
import re

TYPE_CHECKING = False  # importing typing costs each WAL file start-up a few ms
if TYPE_CHECKING:
    from collections.abc import Iterator

UTC = dt.timezone.utc

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(r"(\d+)([smhdw])")


def parse_duration(text: str) -> dt.timedelta:
    """``"90s"``, ``"15m"``, ``"7d"``, ``"1h30m"`` -> timedelta. Raises ValueError."""
    compact = text.strip().replace(" ", "")
    if not compact or _DURATION_RE.sub("", compact):
        raise ValueError(f"not a duration like 15m, 7d or 1h30m: {text!r}")
    seconds = sum(int(n) * _DURATION_UNITS[u] for n, u in _DURATION_RE.findall(compact))
    if seconds <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return dt.timedelta(seconds=seconds)


def parse_timestamp(text: str) -> dt.datetime:
    """RFC 3339 with an explicit offset; a naive timestamp is refused, never guessed."""
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise ValueError(f"not an RFC 3339 timestamp (e.g. 2026-11-24T18:00:00Z): {text!r}") from None
    if value.tzinfo is None:
        raise ValueError(f"timestamp has no UTC offset (add Z or +HH:MM): {text!r}")
    return value.astimezone(UTC)


def format_timestamp(value: dt.datetime) -> str:
    """UTC, RFC 3339, with microseconds only when present."""
    value = value.astimezone(UTC)
    text = value.isoformat(timespec="microseconds" if value.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


BACKUP_ID_RE = re.compile(r"^\d{8}T\d{6}Z(?:-\d+)?$")


def backup_id_candidates(moment: dt.datetime) -> Iterator[str]:
    """``20261124T020000Z``, then ``-2``, ``-3``... for when the previous one is taken; sorts by time."""
    base = moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    yield base
    for n in itertools.count(2):
        yield f"{base}-{n}"


def backup_id_for(moment: dt.datetime, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """The first of ``backup_id_candidates(moment)`` not in ``taken``."""
    return next(c for c in backup_id_candidates(moment) if c not in taken)


def backup_id_sort_key(backup_id: str) -> tuple[str, int]:
    base, _, suffix = backup_id.partition("-")
    return base, int(suffix) if suffix.isdigit() else 1


def backup_id_time(backup_id: str) -> dt.datetime:
    return dt.datetime.strptime(backup_id.partition("-")[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
