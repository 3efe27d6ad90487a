"""The retention planner: each rule's guarantee, the floors and idempotence, over random histories."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupd.errors import EXIT_USAGE, ConfigError
from backupd.retention import RULES, BackupItem, LogItem, PartialItem, PitrPoint, plan
from backupd.settings import RetentionSettings
from backupd.timeutil import backup_id_for

UTC = dt.timezone.utc
BASE = dt.datetime(2025, 1, 1, tzinfo=UTC)
LOG_EVERY = dt.timedelta(minutes=37)


def t(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def log_at(moment: dt.datetime) -> str:
    """The oplog slice covering a moment: one slice every LOG_EVERY from BASE."""
    return f"{(moment - BASE) // LOG_EVERY:08d}"


@st.composite
def histories(draw):
    span_minutes = draw(st.sampled_from([6 * 60, 3 * 24 * 60, 90 * 24 * 60, 3 * 365 * 24 * 60]))
    offsets = draw(st.lists(st.integers(0, span_minutes), min_size=1, max_size=30, unique=True))
    with_logs = draw(st.booleans())
    backups, taken = [], set()
    for offset in sorted(offsets):
        moment = BASE + dt.timedelta(minutes=offset)
        backup_id = backup_id_for(moment, taken)
        taken.add(backup_id)
        has_pitr = with_logs and draw(st.integers(0, 9)) > 0
        pitr = PitrPoint("wal", log_at(moment), moment + dt.timedelta(minutes=2)) if has_pitr else None
        backups.append(BackupItem(backup_id, moment, pitr, pinned=draw(st.integers(0, 9)) == 0))
    newest = max(b.time for b in backups)
    now = newest + dt.timedelta(minutes=draw(st.integers(0, 20 * 24 * 60)))
    logs = []
    if with_logs:
        count = (now - BASE) // LOG_EVERY + 1
        logs = [LogItem("wal", f"{i:08d}", BASE + (i + 1) * LOG_EVERY) for i in range(count)]
        logs.append(LogItem("wal", "00000000.history", BASE))
    return backups, logs, now


def optional_count():
    return st.one_of(st.none(), st.integers(1, 6))


@st.composite
def policies(draw):
    hours = st.one_of(st.none(), st.integers(1, 24 * 120).map(lambda h: dt.timedelta(hours=h)))
    keys = {"keep_last": draw(optional_count()), "keep_hourly": draw(optional_count()),
            "keep_daily": draw(optional_count()), "keep_weekly": draw(optional_count()),
            "keep_monthly": draw(optional_count()), "keep_yearly": draw(optional_count()),
            "keep_within": draw(hours), "pitr_window": draw(hours)}
    policy = RetentionSettings(**{k: v for k, v in keys.items() if v is not None})
    if policy.is_empty():
        policy = RetentionSettings(keep_last=1)
    return policy


ZONES = st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"])
PROPERTY = settings(max_examples=300, deadline=None, derandomize=True)


def expected_keep(backups, policy, now, zone) -> set[str]:
    """Each rule's guarantee, stated independently of the planner's walk."""
    newest_first = sorted(backups, key=lambda b: b.time, reverse=True)
    keep = {newest_first[0].backup_id} | {b.backup_id for b in backups if b.pinned}
    if policy.keep_last:
        keep |= {b.backup_id for b in newest_first[: policy.keep_last]}
    for key, _, period_of in RULES:
        count = getattr(policy, key)
        if not count:
            continue
        newest_in_period: dict[str, BackupItem] = {}
        for b in newest_first:
            newest_in_period.setdefault(period_of(b.time.astimezone(ZoneInfo(zone))), b)
        latest_periods = sorted(newest_in_period.values(), key=lambda b: b.time, reverse=True)[:count]
        keep |= {b.backup_id for b in latest_periods}
    if policy.keep_within:
        keep |= {b.backup_id for b in backups if b.time >= newest_first[0].time - policy.keep_within}
    if policy.pitr_window:
        with_logs = [b for b in newest_first if b.pitr]
        covering = [b for b in with_logs if b.pitr.restorable_from <= now - policy.pitr_window]
        if covering:
            keep.add(covering[0].backup_id)
        elif with_logs:
            keep.add(with_logs[-1].backup_id)
    return keep


@PROPERTY
@given(histories(), policies(), ZONES)
def test_rules_keep_exactly_what_they_promise(history, policy, zone) -> None:
    backups, logs, now = history
    result = plan(backups, logs, policy, now, zone)
    assert set(result.kept_backups()) == expected_keep(backups, policy, now, zone)
    for decision in result.backups:
        assert decision.reasons and all(r.startswith(("keep: ", "delete: ")) for r in decision.reasons)
        assert decision.keep == decision.reasons[0].startswith("keep")
    assert result.backups[0].reasons[0] == "keep: newest"


@PROPERTY
@given(histories(), policies(), ZONES)
def test_logs_every_kept_backup_and_the_window_need_are_kept(history, policy, zone) -> None:
    backups, logs, now = history
    result = plan(backups, logs, policy, now, zone)
    kept_logs = {d.name for d in result.logs if d.keep}
    kept = [b for b in backups if b.backup_id in set(result.kept_backups())]
    starts = [b.pitr.first_log for b in kept if b.pitr]
    for log in logs:
        if log.name.endswith(".history"):
            assert log.name in kept_logs
        elif starts:  # everything from the oldest kept backup's first log on, nothing before
            assert (log.name in kept_logs) == (log.name >= min(starts)), log.name
        else:
            assert log.name in kept_logs
    if policy.pitr_window and any(b.pitr for b in backups):
        window_start = now - policy.pitr_window
        oldest_from = min(b.pitr.restorable_from for b in backups if b.pitr)
        moment = max(window_start, oldest_from)  # the oldest moment the repository could ever restore
        bases = [b for b in kept if b.pitr and b.pitr.restorable_from <= moment]
        assert bases, "no kept backup restores the window's oldest moment"
        assert all(log.name in kept_logs for log in logs if log.name >= bases[0].pitr.first_log)
        assert result.restorable_from is not None and result.restorable_from <= moment


@PROPERTY
@given(histories(), policies(), ZONES)
def test_applying_the_plan_twice_changes_nothing(history, policy, zone) -> None:
    backups, logs, now = history
    first = plan(backups, logs, policy, now, zone)
    kept_b = set(first.kept_backups())
    kept_l = {d.name for d in first.logs if d.keep}
    remaining = [b for b in backups if b.backup_id in kept_b]
    remaining_logs = [log for log in logs if log.name in kept_l]
    second = plan(remaining, remaining_logs, policy, now, zone)
    assert second.deleted_backups() == [] and second.deleted_logs() == []
    assert second.kept_backups() == first.kept_backups()


@PROPERTY
@given(histories(), policies(), ZONES, st.text(min_size=1, max_size=20))
def test_nothing_is_pruned_while_paused(history, policy, zone, why) -> None:
    backups, logs, now = history
    partials = [PartialItem("20200101T000000Z", t("2020-01-01T00:00:00Z"), interrupted_prune=True)]
    result = plan(backups, logs, policy, now, zone, partials=partials, timeout=dt.timedelta(hours=1), paused=why)
    assert all(d.keep for d in result.decisions())
    assert all(f"pruning paused ({why})" in d.reasons[0] for d in result.decisions())


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 48 * 60), max_size=10, unique=True), st.integers(1, 24 * 60))
def test_partials_younger_than_the_timeout_are_never_touched(ages_minutes, timeout_minutes) -> None:
    now = t("2026-06-01T12:00:00Z")
    timeout = dt.timedelta(minutes=timeout_minutes)
    partials = [PartialItem(backup_id_for(now - dt.timedelta(minutes=m)), now - dt.timedelta(minutes=m))
                for m in ages_minutes]
    backups = [BackupItem("20260601T120000Z", now)]
    result = plan(backups, [], RetentionSettings(keep_last=1), now, partials=partials, timeout=timeout)
    for decision in result.partials:
        assert decision.keep == (decision.time > now - timeout)


def test_interrupted_prune_is_finished_whatever_the_age() -> None:
    now = t("2026-06-01T12:00:00Z")
    partial = PartialItem("20260601T115900Z", t("2026-06-01T11:59:00Z"), interrupted_prune=True)
    result = plan([BackupItem("20260601T120000Z", now)], [], RetentionSettings(keep_last=1), now,
                  partials=[partial], timeout=dt.timedelta(hours=6))
    assert result.partials[0].reasons == ["delete: left by an interrupted prune"]


def test_empty_policy_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        plan([BackupItem("20260601T120000Z", t("2026-06-01T12:00:00Z"))], [], RetentionSettings(),
             t("2026-06-02T00:00:00Z"))
    assert info.value.exit_code == EXIT_USAGE
    assert "policy is empty" in str(info.value)


def daily_history() -> list[BackupItem]:
    """Two backups a day (02:00 and 14:00 UTC) from 2026-10-01 to 2026-11-24."""
    items = []
    day = t("2026-10-01T02:00:00Z")
    while day <= t("2026-11-24T14:00:00Z"):
        for hour in (0, 12):
            moment = day + dt.timedelta(hours=hour)
            items.append(BackupItem(backup_id_for(moment), moment))
        day += dt.timedelta(days=1)
    return items


def test_restic_semantics_with_reasons() -> None:
    history = daily_history()
    policy = RetentionSettings(keep_last=3, keep_daily=7, keep_weekly=4, keep_monthly=12)
    result = plan(history, [], policy, t("2026-11-25T00:00:00Z"))
    reasons = {d.name: d.reasons for d in result.backups}
    assert reasons["20261124T140000Z"] == ["keep: newest", "keep: last 1 of 3", "keep: daily 2026-11-24",
                                           "keep: weekly 2026-W48", "keep: monthly 2026-11"]
    assert reasons["20261124T020000Z"] == ["keep: last 2 of 3"]
    assert reasons["20261123T140000Z"] == ["keep: last 3 of 3", "keep: daily 2026-11-23"]  # Monday of W48
    assert reasons["20261118T020000Z"] == ["delete: outside all rules"]
    assert reasons["20261031T140000Z"] == ["keep: monthly 2026-10"]
    daily = [name for name, why in reasons.items() if any(r.startswith("keep: daily") for r in why)]
    assert daily == [f"202611{d:02d}T140000Z" for d in range(24, 17, -1)]
    weekly = [name for name, why in reasons.items() if any(r.startswith("keep: weekly") for r in why)]
    # ISO weeks end on Sunday: the newest backup of each of the 4 newest weeks.
    assert weekly == ["20261124T140000Z", "20261122T140000Z", "20261115T140000Z", "20261108T140000Z"]
    assert len(result.kept_backups()) == 3 + 5 + 2 + 1  # last 3, 5 more dailies, weeklies 11-15 and 11-08, Oct


def test_periods_follow_the_daemon_time_zone() -> None:
    # 23:30 UTC on the 1st is the 2nd in Berlin: in UTC these are two days, in Berlin one.
    a = BackupItem("20261101T120000Z", t("2026-11-01T12:00:00Z"))
    b = BackupItem("20261101T233000Z", t("2026-11-01T23:30:00Z"))
    c = BackupItem("20261102T100000Z", t("2026-11-02T10:00:00Z"))
    policy = RetentionSettings(keep_daily=2)
    now = t("2026-11-03T00:00:00Z")
    assert plan([a, b, c], [], policy, now, "UTC").kept_backups() == [c.backup_id, b.backup_id]
    assert plan([a, b, c], [], policy, now, "Europe/Berlin").kept_backups() == [c.backup_id, a.backup_id]


def test_keep_within_counts_from_the_newest_backup_not_from_now() -> None:
    old = [BackupItem(backup_id_for(t(f"2026-01-0{d}T00:00:00Z")), t(f"2026-01-0{d}T00:00:00Z")) for d in (1, 2, 3)]
    result = plan(old, [], RetentionSettings(keep_within=dt.timedelta(days=1)), t("2026-06-01T00:00:00Z"))
    assert result.kept_backups() == ["20260103T000000Z", "20260102T000000Z"]
    assert result.backups[1].reasons == ["keep: within 1d of the newest"]


def test_pitr_window_keeps_the_base_and_its_logs() -> None:
    def backup(day: int) -> BackupItem:
        moment = t(f"2026-11-{day:02d}T02:00:00Z")
        return BackupItem(backup_id_for(moment), moment, PitrPoint("wal", f"00000001/{day:024X}", moment))

    backups = [backup(d) for d in (10, 13, 16, 19, 22)]
    logs = [LogItem("wal", f"00000001/{d:024X}") for d in range(8, 25)]
    logs += [LogItem("wal", "00000002/00000002.history"), LogItem("wal", f"00000002/{25:024X}")]
    now = t("2026-11-24T12:00:00Z")
    result = plan(backups, logs, RetentionSettings(keep_last=1, pitr_window=dt.timedelta(days=7)), now)
    # The window starts 11-17 12:00; the newest backup restoring that moment is 11-16's.
    assert result.kept_backups() == ["20261122T020000Z", "20261116T020000Z"]
    assert result.backups[2].reasons[0].startswith("keep: needed by PITR window")
    kept_logs = [d.name for d in result.logs if d.keep]
    assert kept_logs[0] == f"00000001/{16:024X}"
    assert "00000002/00000002.history" in kept_logs and f"00000002/{25:024X}" in kept_logs
    assert result.deleted_logs()[0].reasons == ["delete: older than every kept backup and the PITR window need"]
    assert result.window_start == t("2026-11-17T12:00:00Z")
    assert result.restorable_from == t("2026-11-16T02:00:00Z")


def test_binlogs_of_another_server_are_ordered_by_when_they_were_stored() -> None:
    moment = t("2026-11-20T00:00:00Z")
    backup = BackupItem("20261120T000000Z", moment, PitrPoint("binlog", "b-server/binlog.000010", moment))
    logs = [
        LogItem("binlog", "a-server/binlog.000099", t("2026-11-18T00:00:00Z")),  # old primary, before failover
        LogItem("binlog", "b-server/binlog.000009", t("2026-11-19T00:00:00Z")),
        LogItem("binlog", "b-server/binlog.000010", t("2026-11-20T01:00:00Z")),
        LogItem("binlog", "c-server/binlog.000001", t("2026-11-21T00:00:00Z")),  # new primary after another failover
        LogItem("binlog", "d-server/binlog.000001", None),  # no time: cannot be ordered, kept
    ]
    result = plan([backup], logs, RetentionSettings(keep_last=1), t("2026-11-22T00:00:00Z"))
    verdicts = {d.name: d.verdict for d in result.logs}
    assert verdicts == {"a-server/binlog.000099": "delete", "b-server/binlog.000009": "delete",
                        "b-server/binlog.000010": "keep", "c-server/binlog.000001": "keep",
                        "d-server/binlog.000001": "keep"}


def test_logs_are_kept_when_no_backup_says_where_they_begin() -> None:
    moment = t("2026-11-20T00:00:00Z")
    result = plan([BackupItem("20261120T000000Z", moment)], [LogItem("oplog", "0001-0002.bson")],
                  RetentionSettings(keep_last=1, pitr_window=dt.timedelta(days=1)), moment)
    assert result.logs[0].reasons == ["keep: no kept backup records where its logs begin"]
    assert any("no backup records where its logs begin" in w for w in result.warnings)
