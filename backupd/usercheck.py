"""The job's own verification checks (``verify.checks``): a driver runs each one and says what it answered;
``judge`` alone decides whether it passed.

A check passes when it ran and its answer is true: no row, NULL/nil, false, 0, an empty string and an empty
list fail; anything else passes. A byte string (a Redis reply: Redis has no booleans) is read as text, so
"0" fails too. A check that could not run fails with the driver's error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backupd.driver import Check

SHOWN = 200  #: characters of a failing answer kept in the report (it is restored content)


class _NoRow:
    def __repr__(self) -> str:
        return "no row"


#: The answer of a query that returned no row.
NO_ROW: Any = _NoRow()


@dataclass(frozen=True)
class Answer:
    check: str  # the check as configured
    value: Any = NO_ROW  # the first column of the first row, the command's reply, the count found
    error: str | None = None  # why it could not run (the check fails with this as its detail)
    shown: str | None = None  # how the driver writes the value in a report, where ``str`` is not its way


def passes(value: Any) -> bool:
    if value is NO_ROW or value is None:
        return False
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode(errors="replace") not in ("", "0")
    return bool(value)


def judge(answer: Answer) -> Check:
    """The report's line for one check: its name, passed or not, and (failed) what it answered."""
    if answer.error is not None:
        return Check(answer.check, False, answer.error)
    if passes(answer.value):
        return Check(answer.check, True, "")
    shown = answer.shown if answer.shown is not None else str(answer.value)
    shown = shown if len(shown) <= SHOWN else shown[:SHOWN] + "..."
    return Check(answer.check, False, f"returned {shown}")
