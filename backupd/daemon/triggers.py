"""A job's ``schedule`` as an APScheduler 3.x trigger, with standard cron semantics.

APScheduler 3.x numbers weekdays from Monday (0) where cron starts on Sunday
(0 and 7), and it ANDs day-of-month with day-of-week where cron ORs them when
both are restricted. Both are translated here, so ``0 2 * * 1`` means Monday.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from backupd.schedule import _NAMES, parse_schedule

_APS_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # index = cron number


def cron_weekdays(field: str) -> str:
    """A cron day-of-week field as APScheduler day names (``1-5`` -> ``mon,tue,wed,thu,fri``)."""
    if field == "*":
        return "*"
    days: set[int] = set()
    for item in field.split(","):
        body, _, step_text = item.partition("/")
        step = int(step_text) if step_text else 1
        if body == "*":
            low, high = 0, 6
        else:
            low_text, _, high_text = body.partition("-")
            low = _day(low_text)
            high = _day(high_text) if high_text else (6 if step_text else low)
            if high_text and high == 0 and low > 0:
                high = 7  # "5-7" / "5-0" run to Sunday
        days.update(n % 7 for n in range(low, high + 1, step))
    return ",".join(_APS_DAYS[n] for n in sorted(days))


def _day(text: str) -> int:
    if text.isdigit():
        return int(text)
    return _NAMES["day of week"].index(text.lower())


def build_trigger(schedule: str, timezone: dt.tzinfo, jitter: dt.timedelta | None = None) -> BaseTrigger:
    parsed = parse_schedule(schedule)
    jitter_s = int(jitter.total_seconds()) if jitter else None
    if parsed.every is not None:
        return IntervalTrigger(seconds=parsed.every.total_seconds(), timezone=timezone, jitter=jitter_s)
    assert parsed.cron is not None
    minute, hour, dom, month, dow = parsed.cron.split()
    fields: dict[str, Any] = {"minute": minute, "hour": hour, "month": month, "timezone": timezone, "jitter": jitter_s}
    if dom != "*" and dow != "*":  # cron: either may match
        return OrTrigger([CronTrigger(day=dom, **fields), CronTrigger(day_of_week=cron_weekdays(dow), **fields)],
                         jitter=jitter_s)
    return CronTrigger(day=dom, day_of_week=cron_weekdays(dow), **fields)


def period(trigger: BaseTrigger, now: dt.datetime) -> dt.timedelta:
    """The gap between the trigger's next two fire times (its interval, for a cron)."""
    if isinstance(trigger, IntervalTrigger):
        return trigger.interval
    first = trigger.get_next_fire_time(None, now)
    second = trigger.get_next_fire_time(first, first + dt.timedelta(microseconds=1)) if first else None
    if first is None or second is None:
        return dt.timedelta(days=1)
    return second - first


def latest_missed(trigger: BaseTrigger, last: dt.datetime, now: dt.datetime,
                  limit: int = 100_000) -> dt.datetime | None:
    """The newest fire time in (last, now], or None when no run was due since ``last``."""
    if isinstance(trigger, IntervalTrigger):
        if now - last < trigger.interval:
            return None
        runs = (now - last) // trigger.interval
        return last + runs * trigger.interval
    latest = None
    moment = trigger.get_next_fire_time(None, last + dt.timedelta(microseconds=1))
    for _ in range(limit):
        if moment is None or moment > now:
            break
        latest = moment
        moment = trigger.get_next_fire_time(moment, moment + dt.timedelta(microseconds=1))
    return latest
