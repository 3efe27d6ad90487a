"""Validation and parsing of a job's ``schedule``: 5-field cron or ``@every <duration>``."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from backupd.timeutil import parse_duration

_CRON_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
)
_NAMES = {
    "month": ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
    "day of week": ["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
}
_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}


@dataclass(frozen=True)
class Schedule:
    """Either a cron expression (``cron``) or a fixed interval (``every``)."""

    text: str
    cron: str | None = None
    every: dt.timedelta | None = None


def parse_schedule(text: str) -> Schedule:
    stripped = " ".join(text.split())
    if stripped.startswith("@every"):
        rest = stripped[len("@every"):].strip()
        if not rest:
            raise ValueError("@every needs a duration, e.g. '@every 15m'")
        return Schedule(text=text, every=parse_duration(rest))
    if stripped in _MACROS:
        return Schedule(text=text, cron=_MACROS[stripped])
    fields = stripped.split(" ")
    if len(fields) != 5:
        raise ValueError("expected a 5-field cron expression (minute hour day month weekday) or '@every <duration>'")
    for value, (name, low, high) in zip(fields, _CRON_FIELDS):
        _check_cron_field(value, name, low, high)
    return Schedule(text=text, cron=stripped)


def _check_cron_field(value: str, name: str, low: int, high: int) -> None:
    for item in value.split(","):
        body, _, step = item.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"cron {name}: bad step in {item!r}")
        if body == "*":
            continue
        for bound in body.split("-", 1):
            number = _cron_number(bound, name)
            if number is None or not low <= number <= high:
                raise ValueError(f"cron {name}: {bound!r} is not in {low}-{high}")


def _cron_number(text: str, name: str) -> int | None:
    if text.isdigit():
        return int(text)
    names = _NAMES.get(name)
    if names and text.lower() in names:
        return names.index(text.lower()) + (1 if name == "month" else 0)
    return None
