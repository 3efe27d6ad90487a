"""Retention: which backups and logs to keep, as a pure function of the catalog and the policy.

``plan()`` does no I/O: ``backupd prune`` feeds it what the repository holds and
applies what it returns. Every decision carries its reasons, so ``--dry-run``
explains each kept item. The calendar rules are data (``RULES``) with restic's
semantics: walking back from the newest backup, a rule keeps the newest backup
of each calendar period that has backups, until it has kept ``keep_<period>``
of them; rules are OR'ed. Periods are computed in the daemon's time zone and
weeks are ISO weeks.

Floors, which no policy overrides:

* the newest backup is always kept;
* a kept diff or incr keeps its parent, and that one its own, up to its full
  ("parent of X"); a backup whose full expires goes with it ("expired with its
  full Y"): no backup is ever left without its parent;
* pinned backups are kept;
* backups that storage still holds under a retention (S3 Object Lock,
  ``BackupItem.locked_until``) are kept, and so are the logs they need;
* when the job's newest backup run failed, nothing is pruned (``paused``);
* a directory without a manifest younger than the job timeout may still be
  being written and is never touched;
* an empty policy is refused.

Logs (WAL, binlog, oplog) are kept from the first log of the oldest kept
backup that records one (``metadata.pitr.first_log``), so every kept backup
can still be made consistent and rolled forward to the newest log. Names sort
in archive order within a directory; the driver that archives a kind says
whether they also sort across directories and which logs are always kept
(``backupd.lognaming``: WAL timelines and oplog slices sort across the archive,
timeline histories are kept). Directories of logs that do not sort across
(binlogs of other servers) are ordered by when they were stored.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Sequence
from zoneinfo import ZoneInfo

from backupd.errors import ConfigError
from backupd.lognaming import LogNaming, naming
from backupd.settings import RetentionSettings
from backupd.timeutil import backup_id_sort_key, format_timestamp

#: (policy key, label, period of a local time). Order only matters for the order of reasons.
RULES: tuple[tuple[str, str, Callable[[dt.datetime], str]], ...] = (
    ("keep_hourly", "hourly", lambda t: t.strftime("%Y-%m-%d %H:00")),
    ("keep_daily", "daily", lambda t: t.strftime("%Y-%m-%d")),
    ("keep_weekly", "weekly", lambda t: "%04d-W%02d" % t.isocalendar()[:2]),
    ("keep_monthly", "monthly", lambda t: t.strftime("%Y-%m")),
    ("keep_yearly", "yearly", lambda t: t.strftime("%Y")),
)

@dataclass(frozen=True)
class PitrPoint:
    """Where a backup's logs begin, and the earliest moment it can restore to."""

    kind: str
    first_log: str
    restorable_from: dt.datetime


@dataclass(frozen=True)
class BackupItem:
    backup_id: str
    time: dt.datetime  # when the backup started (its id's time)
    pitr: PitrPoint | None = None
    pinned: bool = False
    #: Storage refuses to delete (some of) its objects before then (Object Lock).
    locked_until: dt.datetime | None = None
    #: full, diff or incr; a diff or incr names the backup it was taken against (DESIGN.md "Backup types").
    backup_type: str = "full"
    parent: str | None = None


@dataclass(frozen=True)
class PartialItem:
    """A backup directory without a manifest."""

    backup_id: str
    time: dt.datetime
    interrupted_prune: bool = False  # its manifest was deleted by a prune that did not finish


@dataclass(frozen=True)
class LogItem:
    kind: str
    name: str
    stored_at: dt.datetime | None = None


@dataclass
class Decision:
    kind: str  # "backup", "partial", or a log kind ("wal", "binlog", "oplog")
    name: str
    time: dt.datetime | None
    keep: bool
    reasons: list[str]

    @property
    def verdict(self) -> str:
        return "keep" if self.keep else "delete"


@dataclass
class Plan:
    backups: list[Decision]  # newest first
    partials: list[Decision]
    logs: list[Decision]  # by kind, in name order
    paused: str | None = None
    window_start: dt.datetime | None = None
    pitr_base: str | None = None  # the backup the window's oldest moment restores from
    #: Earliest moment the repository can restore to once the plan is applied (None: no PITR).
    restorable_from: dt.datetime | None = None
    warnings: list[str] = field(default_factory=list)
    #: Why, for each backup whose manifest no trusted key signed: not planned from, never deleted by it.
    untrusted: list[str] = field(default_factory=list)
    #: Per log kind, the name from which on every log is kept, unlisted (``deletable_below``): ``logs`` holds
    #: only what sorts before it.
    logs_kept_from: dict[str, str] = field(default_factory=dict)

    def decisions(self) -> list[Decision]:
        return [*self.backups, *self.partials, *self.logs]

    def kept_backups(self) -> list[str]:
        return [d.name for d in self.backups if d.keep]

    def deleted_backups(self) -> list[str]:
        return [d.name for d in self.backups if not d.keep]

    def deleted_partials(self) -> list[str]:
        return [d.name for d in self.partials if not d.keep]

    def deleted_logs(self) -> list[Decision]:
        return [d for d in self.logs if not d.keep]


def plan(
    backups: Iterable[BackupItem],
    logs: Iterable[LogItem],
    policy: RetentionSettings,
    now: dt.datetime,
    tz: dt.tzinfo | str = "UTC",
    *,
    partials: Iterable[PartialItem] = (),
    timeout: dt.timedelta | None = None,
    paused: str | None = None,
    namings: Callable[[str], LogNaming] = naming,
) -> Plan:
    """Decide, with reasons, what to keep and what to delete.

    ``paused`` (why pruning must not happen now, e.g. the newest run failed)
    keeps everything. ``timeout`` is the job's timeout: a partial directory
    older than it is abandoned and removed; without it partials are kept.
    ``namings`` gives each log kind's naming (by default the one its driver describes).
    Raises ConfigError for an empty policy.
    """
    if policy.is_empty():
        raise ConfigError(
            "the retention policy is empty; refusing to prune (it would keep only the newest backup)",
            hint="set at least one of keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, "
                 "keep_yearly, keep_within, pitr_window in the job's retention table",
        )
    zone = ZoneInfo(tz) if isinstance(tz, str) else tz
    ordered = sorted(backups, key=lambda b: (b.time, backup_id_sort_key(b.backup_id)), reverse=True)
    reasons: dict[str, list[str]] = {b.backup_id: [] for b in ordered}
    result = Plan(backups=[], partials=[], logs=[], paused=paused)

    if paused:
        for b in ordered:
            reasons[b.backup_id].append(f"keep: pruning paused ({paused})")
    elif ordered:
        _apply_rules(ordered, policy, zone, reasons)
        base = _pitr_base(ordered, policy, now, result)
        if base is not None:
            result.pitr_base = base.backup_id
            reasons[base.backup_id].append(
                f"keep: needed by PITR window (restores from {format_timestamp(base.pitr.restorable_from)})"  # type: ignore[union-attr]
            )
        for b in ordered:
            if b.pinned:
                reasons[b.backup_id].append("keep: pinned")
            if b.locked_until is not None:
                reasons[b.backup_id].append(f"keep: {locked_reason(b.locked_until)}")
        reasons[ordered[0].backup_id].insert(0, "keep: newest")
        _keep_parents(ordered, reasons, result)
    by_id = {b.backup_id: b for b in ordered}
    for b in ordered:
        why = reasons[b.backup_id] or [_expired(b, by_id, reasons)]
        result.backups.append(Decision("backup", b.backup_id, b.time, why[0].startswith("keep"), why))

    kept = [b for b in ordered if reasons[b.backup_id]]
    result.partials = _plan_partials(partials, now, timeout, paused)
    result.logs = _plan_logs(list(logs), kept, paused, result, namings)
    points = [b.pitr.restorable_from for b in kept if b.pitr is not None]
    result.restorable_from = min(points) if points else None
    return result


def _keep_parents(ordered: Sequence[BackupItem], reasons: dict[str, list[str]], result: Plan) -> None:
    """A kept diff or incr keeps its parent, and so on to its full: a backup is never left without its parent."""
    by_id = {b.backup_id: b for b in ordered}
    pending = [b for b in ordered if reasons[b.backup_id]]
    done: set[str] = set()
    while pending:
        child = pending.pop()
        if child.parent is None or child.backup_id in done:
            continue
        done.add(child.backup_id)
        parent = by_id.get(child.parent)
        if parent is None:
            result.warnings.append(f"backup {child.backup_id}: its parent {child.parent} is missing from the "
                                   "repository (or untrusted); it cannot be restored")
            continue
        reasons[parent.backup_id].append(f"keep: parent of {child.backup_id}")
        pending.append(parent)


def _expired(backup: BackupItem, by_id: dict[str, BackupItem], reasons: dict[str, list[str]]) -> str:
    """Why an unkept backup goes: on its own, or with the full its chain starts from."""
    seen = {backup.backup_id}
    item = backup
    while item.parent is not None and item.parent in by_id and item.parent not in seen:
        item = by_id[item.parent]
        seen.add(item.backup_id)
    if item is not backup and item.backup_type == "full" and not reasons[item.backup_id]:
        return f"delete: expired with its full {item.backup_id}"
    return "delete: outside all rules"


def guaranteed_keep(policy: RetentionSettings, kind: Literal["backup", "log"] = "backup") -> dt.timedelta:
    """The shortest time ``policy`` promises to keep an object of ``kind`` written now.

    Zero when it promises nothing. New backup data is put with
    ``retain_until`` = now + this (``Storage.put``): a storage lock then lasts
    until the policy could first delete the object, and not much longer.

    * A backup is kept by ``keep_within`` while it is within that duration of
      the newest backup; the newest is never older than now, so a backup
      started now is kept at least ``keep_within``.
    * A log is kept by ``pitr_window`` while its moment lies inside the window:
      the window's base backup reaches back to the window's start, and every log
      from the base's first one on is kept. So a log stored now is kept at least
      ``pitr_window``.
    * The other pairs promise nothing. Count and calendar rules (``keep_last``,
      ``keep_hourly`` ... ``keep_yearly``) count backups, not time: another
      backup an hour later (or a manual one a minute later) can displace this
      one from ``last 3`` or from its day. ``pitr_window`` keeps only the
      window's base and the newest backup, so a backup in between can go as
      soon as a newer one exists. ``keep_within`` keeps a log only through the
      backups that need it, which may be older than the log by up to a backup
      interval.
    """
    if kind == "backup":
        return policy.keep_within or dt.timedelta(0)
    if kind == "log":
        return policy.pitr_window or dt.timedelta(0)
    raise ValueError(f"unknown object kind {kind!r}")


def locked_reason(until: dt.datetime) -> str:
    if until.year == dt.MAXYEAR:
        return "locked (Object Lock legal hold)"
    return f"locked until {format_timestamp(until)} (Object Lock)"


def _apply_rules(ordered: Sequence[BackupItem], policy: RetentionSettings, zone: dt.tzinfo,
                 reasons: dict[str, list[str]]) -> None:
    if policy.keep_last:
        for position, b in enumerate(ordered[: policy.keep_last], start=1):
            reasons[b.backup_id].append(f"keep: last {position} of {policy.keep_last}")
    for key, label, period_of in RULES:
        count = getattr(policy, key)
        if not count:
            continue
        last_period: str | None = None
        for b in ordered:
            if count == 0:
                break
            period = period_of(b.time.astimezone(zone))
            if period != last_period:
                reasons[b.backup_id].append(f"keep: {label} {period}")
                last_period = period
                count -= 1
    if policy.keep_within:
        since = ordered[0].time - policy.keep_within
        for b in ordered:
            if b.time >= since:
                reasons[b.backup_id].append(f"keep: within {_duration(policy.keep_within)} of the newest")


def _pitr_base(ordered: Sequence[BackupItem], policy: RetentionSettings, now: dt.datetime,
               result: Plan) -> BackupItem | None:
    """The backup the oldest moment of the PITR window restores from."""
    if not policy.pitr_window:
        return None
    start = now - policy.pitr_window
    result.window_start = start
    with_logs = [b for b in ordered if b.pitr is not None]
    if not with_logs:
        result.warnings.append("pitr_window is set but no backup records where its logs begin (is archive_logs on?)")
        return None
    covering = [b for b in with_logs if b.pitr.restorable_from <= start]  # type: ignore[union-attr]
    if covering:
        return covering[0]  # the newest that reaches back to the window's start
    oldest = with_logs[-1]
    result.warnings.append(
        f"the PITR window starts at {format_timestamp(start)} but the oldest backup restores from "
        f"{format_timestamp(oldest.pitr.restorable_from)}"  # type: ignore[union-attr]
    )
    return oldest


def _plan_partials(partials: Iterable[PartialItem], now: dt.datetime, timeout: dt.timedelta | None,
                   paused: str | None) -> list[Decision]:
    decisions = []
    for p in sorted(partials, key=lambda p: backup_id_sort_key(p.backup_id), reverse=True):
        if paused:
            why = f"keep: pruning paused ({paused})"
        elif p.interrupted_prune:
            why = "delete: left by an interrupted prune"
        elif timeout is not None and p.time <= now - timeout:
            why = f"delete: abandoned (no manifest, older than the job timeout {_duration(timeout)})"
        else:
            why = "keep: no manifest yet; may still be being written"
        decisions.append(Decision("partial", p.backup_id, p.time, why.startswith("keep"), [why]))
    return decisions


def _directory(name: str) -> str:
    return name.rpartition("/")[0]


def deletable_below(result: Plan, backups: Iterable[BackupItem], kind: str,
                    namings: Callable[[str], LogNaming] = naming) -> str | None:
    """What a prune must list of the logs of ``kind`` for ``_plan_logs`` to find every one ``result`` lets go:
    the name they all sort before (``LogArchive.list_before``), "" when none can go (nothing to list), None
    when any may (names that do not sort across directories: list them all).

    Logs at or after the oldest kept backup's first log are needed by it whatever else the archive holds, so
    a listing that stops there misses only logs that are kept."""
    if result.paused:
        return ""
    kept = set(result.kept_backups())
    starts = [b.pitr.first_log for b in backups if b.backup_id in kept and b.pitr is not None and b.pitr.kind == kind]
    if not starts:
        return ""
    return min(starts) if namings(kind).ordered_across else None


def _plan_logs(logs: list[LogItem], kept: list[BackupItem], paused: str | None, result: Plan,
               namings: Callable[[str], LogNaming]) -> list[Decision]:
    decisions: list[Decision] = []
    for kind in sorted({log.kind for log in logs}):
        items = sorted((log for log in logs if log.kind == kind), key=lambda log: log.name)
        # Oldest kept backup first, so "needed by" names the backup that reaches back furthest.
        starts = [(b.pitr.first_log, b) for b in reversed(kept) if b.pitr is not None and b.pitr.kind == kind]
        if paused or not starts:
            reason = f"keep: pruning paused ({paused})" if paused else "keep: no kept backup records where its logs begin"
            decisions.extend(Decision(kind, log.name, log.stored_at, True, [reason]) for log in items)
            continue
        described = namings(kind)
        across = described.ordered_across
        start_dirs = {_directory(first) for first, _ in starts}

        def needed_by(name: str) -> BackupItem | None:
            for first, backup in starts:
                if name >= first and (across or _directory(name) == _directory(first)):
                    return backup
            return None

        needed = {log.name: needed_by(log.name) for log in items}
        stored = [log.stored_at for log in items if needed[log.name] is not None and log.stored_at is not None]
        earliest_needed = min(stored) if stored else None
        for log in items:
            why: list[str] = []
            if (always := described.always_keep(log.name)) is not None:
                why.append(f"keep: {always}")
            backup = needed[log.name]
            if backup is not None and backup.backup_id == result.pitr_base:
                why.append(f"keep: needed by PITR window (base {backup.backup_id})")
            elif backup is not None:
                why.append(f"keep: needed by backup {backup.backup_id}")
            elif not across and _directory(log.name) not in start_dirs:
                # Another server's binlogs: only the time they were stored orders them.
                if earliest_needed is None or log.stored_at is None:
                    why.append("keep: cannot be ordered against the kept backups' logs")
                elif log.stored_at >= earliest_needed:
                    why.append("keep: stored after the oldest log a kept backup needs")
            if not why:
                why.append("delete: older than every kept backup and the PITR window need")
            decisions.append(Decision(kind, log.name, log.stored_at, why[0].startswith("keep"), why))
    return decisions


def _duration(value: dt.timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
