"""The index's record of the log archive as the last full check listed it (``index.json``'s ``log_summary``).

Commands that list a whole log archive anyway (``verify``, ``verify --integrity-only``, the daemon's
integrity rotation, a ``list`` that had to) record per log kind a *checkpoint*, the greatest log name
that listing held and when it was taken, and each backup's reach as it was computed then. ``list``
then lists only the logs from the checkpoint on (``backupd.reaches``). Document, per kind::

    {"checkpoint": NAME, "taken_at": RFC 3339,
     "reaches": [{"backups": [BACKUP_ID, ...], "last_log", "until", "first_missing", "missing", "notes"}]}

Backups whose logs reach as far share one entry (every backup before the same gap, or reaching the
newest log), so the summary grows with the gaps, not with the backups, and reading the index with it
costs next to nothing more.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backupd.timeutil import format_timestamp, parse_timestamp

if TYPE_CHECKING:
    from backupd.driver import LogReach

#: At most this many missing-log messages of one reach are recorded (the first gap is what ``list`` shows).
MAX_MISSING = 16


@dataclass
class LogSummary:
    checkpoint: str  #: the greatest log name the full listing held
    taken_at: dt.datetime  #: when that listing was taken
    reaches: dict[str, LogReach] = field(default_factory=dict)  #: by backup id, as computed from it

    def to_json(self) -> dict[str, Any]:
        shared: dict[LogReach, list[str]] = {}
        for backup_id, reach in sorted(self.reaches.items()):
            shared.setdefault(dataclasses.replace(reach, missing=reach.missing[:MAX_MISSING]), []).append(backup_id)
        return {"checkpoint": self.checkpoint, "taken_at": format_timestamp(self.taken_at),
                "reaches": [{"backups": ids, **_reach_json(reach)} for reach, ids in shared.items()]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LogSummary:
        """TypeError/ValueError/KeyError/AttributeError on anything malformed (the index is then unreadable)."""
        checkpoint, groups = data["checkpoint"], data["reaches"]
        if not isinstance(checkpoint, str) or not isinstance(groups, list):
            raise TypeError("log_summary: checkpoint or reaches of the wrong type")
        reaches: dict[str, LogReach] = {}
        for group in groups:
            reach, ids = _reach(group), group["backups"]
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise TypeError("log_summary: a reach's backups are of the wrong type")
            reaches.update(dict.fromkeys(ids, reach))
        return cls(checkpoint, parse_timestamp(str(data["taken_at"])), reaches)


def _reach_json(reach: LogReach) -> dict[str, Any]:
    return {"last_log": reach.last_log, "until": format_timestamp(reach.until) if reach.until else None,
            "first_missing": reach.first_missing, "missing": list(reach.missing), "notes": list(reach.notes)}


def _reach(data: dict[str, Any]) -> LogReach:
    from backupd.driver import LogReach

    texts = {name: data[name] for name in ("last_log", "first_missing")}
    if not all(isinstance(v, (str, type(None))) for v in texts.values()):
        raise TypeError("log_summary: a reach's log names are of the wrong type")
    lists = {name: data[name] for name in ("missing", "notes")}
    if not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in lists.values()):
        raise TypeError("log_summary: a reach's messages are of the wrong type")
    until = data["until"]
    return LogReach(last_log=texts["last_log"], until=parse_timestamp(str(until)) if until is not None else None,
                    first_missing=texts["first_missing"], missing=tuple(lists["missing"]), notes=tuple(lists["notes"]))


def parse(data: object) -> dict[str, LogSummary]:
    """``log_summary`` of an index payload ({} when absent)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TypeError("log_summary is not an object")
    return {str(kind): LogSummary.from_json(value) for kind, value in data.items()}
