"""The daemon's parts in-process: triggers, persisted state, sd_notify, slots, supervision, abort."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import threading
import time
import zoneinfo
from pathlib import Path

import pytest

from backupd import progress
from backupd.backup import run_backup
from backupd.context import JobContext
from backupd.daemon.notify import Notifier
from backupd.daemon.runs import Runs, Slots
from backupd.daemon.state import DaemonLock, DaemonRunning, ScheduleState
from backupd.daemon.supervisor import Supervised
from backupd.daemon.triggers import build_trigger, cron_weekdays, latest_missed, period
from backupd.errors import Aborted
from backupd.settings import load_settings
from core_fixtures import Keys, sqlite_job_config
from s3_server import dangling_uploads
from test_killed_backup import big_db

UTC = zoneinfo.ZoneInfo("UTC")


@pytest.mark.parametrize("field, names", [
    ("*", "*"), ("0", "sun"), ("7", "sun"), ("1-5", "mon,tue,wed,thu,fri"), ("5-7", "sun,fri,sat"),
    ("*/2", "sun,tue,thu,sat"), ("sat,sun", "sun,sat"), ("mon-wed", "mon,tue,wed"),
])
def test_cron_weekdays_follow_cron_not_apscheduler(field: str, names: str) -> None:
    assert cron_weekdays(field) == names


def test_cron_triggers_use_cron_semantics() -> None:
    tuesday = dt.datetime(2026, 11, 24, 12, tzinfo=UTC)
    monday_2am = build_trigger("0 2 * * 1", UTC)
    assert monday_2am.get_next_fire_time(None, tuesday) == dt.datetime(2026, 11, 30, 2, tzinfo=UTC)
    assert period(monday_2am, tuesday) == dt.timedelta(days=7)
    # day-of-month OR day-of-week, as cron does: the 1st, or any Monday
    either = build_trigger("0 2 1 * 1", UTC)
    assert either.get_next_fire_time(None, tuesday) == dt.datetime(2026, 11, 30, 2, tzinfo=UTC)
    assert either.get_next_fire_time(None, dt.datetime(2026, 11, 30, 3, tzinfo=UTC)) == \
        dt.datetime(2026, 12, 1, 2, tzinfo=UTC)
    berlin = build_trigger("0 2 * * *", zoneinfo.ZoneInfo("Europe/Berlin"))
    assert berlin.get_next_fire_time(None, tuesday).astimezone(UTC) == dt.datetime(2026, 11, 25, 1, tzinfo=UTC)


def test_latest_missed() -> None:
    now = dt.datetime(2026, 11, 24, 12, tzinfo=UTC)
    daily = build_trigger("0 2 * * *", UTC)
    assert latest_missed(daily, now - dt.timedelta(days=3), now) == dt.datetime(2026, 11, 24, 2, tzinfo=UTC)
    assert latest_missed(daily, dt.datetime(2026, 11, 24, 2, tzinfo=UTC), now) is None
    every = build_trigger("@every 15m", UTC)
    assert latest_missed(every, now - dt.timedelta(minutes=40), now) == now - dt.timedelta(minutes=10)
    assert latest_missed(every, now - dt.timedelta(minutes=5), now) is None


def test_schedule_state_persists_and_survives_corruption(tmp_path: Path) -> None:
    state = ScheduleState(tmp_path)
    moment = dt.datetime(2026, 11, 24, 2, 0, 0, 500000, tzinfo=dt.timezone.utc)
    state.set_last_run("backup:shop", moment)
    state.set_last_run("backup:shop", moment - dt.timedelta(seconds=1))  # never moves backwards
    state.set_last_run("backup:shop", moment + dt.timedelta(days=1), only_if_missing=True)
    assert ScheduleState(tmp_path).last_run("backup:shop") == moment
    (tmp_path / "schedule.json").write_text("{not json")
    assert ScheduleState(tmp_path).last_run("backup:shop") is None


def test_daemon_lock_is_exclusive(tmp_path: Path) -> None:
    first = DaemonLock(tmp_path)
    first.acquire()
    with pytest.raises(DaemonRunning, match=f"already running on state_dir {tmp_path} \\(pid {os.getpid()}\\)") as info:
        DaemonLock(tmp_path).acquire()
    assert info.value.exit_code == 2
    first.release()
    DaemonLock(tmp_path).acquire()


def test_notifier_speaks_the_sd_notify_protocol(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000",
                             "WATCHDOG_PID": str(os.getpid())})
        assert notifier.watchdog_interval == 2.0
        notifier.ready("2 jobs")
        assert sock.recv(4096).decode().split("\n")[:2] == ["READY=1", "STATUS=2 jobs"]
        notifier.watchdog()
        notifier.watchdog()  # within half the interval: not repeated
        notifier.stopping("bye")
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    Notifier({}).ready("no systemd")  # a no-op


def test_slots_bound_parallelism_and_give_up_on_cancel() -> None:
    slots = Slots(1)
    never = threading.Event()
    assert slots.acquire(never)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    assert not slots.acquire(cancel)
    slots.resize(2)
    assert slots.acquire(never)
    slots.close()
    assert not slots.acquire(never)


def test_run_timeout_sets_the_cancel_event() -> None:
    runs = Runs()
    with runs.start("backup:shop", "shop", timeout=0.2) as run:
        assert run.cancel.wait(5) and run.reason == "timeout"
        with pytest.raises(Aborted, match="timeout"):
            run.check()
    assert runs.wait_idle(0)


class Flaky:
    name = "flaky"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def run(self, stop: threading.Event) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"boom {self.calls}")
        stop.wait()


def test_supervisor_restarts_with_backoff() -> None:
    archiver = Flaky(failures=3)
    supervised = Supervised("shop", archiver, backoff_max=0.2, first_delay=0.05, settle=0.3)
    supervised.start()
    deadline = time.monotonic() + 10
    while (archiver.calls < 4 or supervised.state != "running") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert supervised.restarts == 3 and supervised.healthy
    assert supervised.last_error == "RuntimeError: boom 3"
    assert supervised.stop(5) and supervised.state == "stopped"


class CancelAfter:
    """A progress sink that sets ``cancel`` once ``limit`` bytes went through the pipeline."""

    def __init__(self, cancel: threading.Event, limit: int) -> None:
        self.cancel, self.limit, self.done = cancel, limit, 0

    def expect(self, count: int) -> None:
        pass

    def advance(self, count: int) -> None:
        self.done += count
        if self.done >= self.limit:
            self.cancel.set()

    def finish(self) -> None:
        pass


@pytest.mark.parametrize("backend", ["filesystem", "s3"])
def test_sqlite_backup_aborts_cleanly_mid_stream(tmp_path: Path, keys: Keys, backend: str,
                                                 request: pytest.FixtureRequest) -> None:
    db = tmp_path / "big.sqlite3"
    big_db(db, 40)
    if backend == "s3":
        endpoint, bucket = request.getfixturevalue("moto_server"), request.getfixturevalue("s3_bucket")
        table = {"type": "s3", "bucket": bucket, "endpoint_url": endpoint, "part_size": 5 * 1024 * 1024}
    else:
        table = {"type": "filesystem", "path": str(tmp_path / "repo")}
    settings = load_settings(sqlite_job_config(tmp_path, keys, table, db))
    ctx = JobContext(settings, "shop")
    cancel = threading.Event()
    progress.install(CancelAfter(cancel, 16 << 20))  # past two 5 MiB parts: a multipart upload is open
    try:
        with pytest.raises(Aborted):
            run_backup(ctx, cancel=cancel)
    finally:
        progress.install(None)
    assert list(ctx.storage.list("shop/backups/")) == []
    assert list((tmp_path / "state" / "spool" / "shop").iterdir()) == [], "the snapshot copy was left behind"
    if backend == "s3":
        assert dangling_uploads(endpoint, bucket) == []
    else:
        assert not list((tmp_path / "repo").rglob(".tmp-*")), "a temp file of the aborted upload was left"
        assert not list((tmp_path / "repo" / "shop" / "backups").rglob("*.zst.age"))
    assert run_backup(ctx).backup_id  # the next run is accepted
    ctx.close()


def test_progress_line() -> None:
    class Sink:
        text = ""

        def write(self, data: str) -> None:
            self.text += data

        def flush(self) -> None:
            pass

    sink = Sink()
    reporter = progress.Reporter("restore shop", sink, interval=0)  # type: ignore[arg-type]
    reporter.expect(10 << 20)
    reporter.advance(5 << 20)
    assert "restore shop: 5.0 MiB of 10.0 MiB (50%)" in sink.text and "/s, ETA " in sink.text
    reporter.finish()
    assert sink.text.endswith("\r\x1b[K")
    progress.advance(1)  # nothing installed: a no-op


def test_audit_events_are_json_lines(tmp_path: Path) -> None:
    from backupd import audit
    from storage.filesystem import FilesystemStorage

    storage = FilesystemStorage(tmp_path / "repo")
    event = audit.make_event("backup", job="shop", backup_id="20261124T020000Z", result="success")
    audit.record(tmp_path / "state", event, storage)
    audit.record(tmp_path / "state", audit.make_event("keys generate", job=None, backup_id=None, result="success"))
    lines = [json.loads(line) for line in (tmp_path / "state" / "audit.log").read_text().splitlines()]
    assert [line["command"] for line in lines] == ["backup", "keys generate"]
    assert set(lines[0]) >= {"time", "user", "host", "command", "job", "backup_id", "result"}
    shipped = list(storage.list("shop/audit/"))
    assert len(shipped) == 1 and json.loads(storage.open(shipped[0].key).read()) == event


def test_integrity_rotation_reads_unread_backups_and_reports_corruption(sqlite_job, tmp_path: Path) -> None:
    from backupd import metrics
    from backupd.daemon.tasks import Tasks
    from backupd.errors import BackupdError

    settings = load_settings(sqlite_job.config)
    ctx = JobContext(settings, "shop")
    ids = [run_backup(ctx).backup_id for _ in range(3)]
    state = ScheduleState(sqlite_job.state_dir)
    tasks = Tasks(lambda: settings, Runs(), Slots(1), state)
    tasks.integrity("shop")
    assert sorted(state.integrity_reads("shop")) == ids  # never read before: all are due
    tasks.integrity("shop")  # nothing due; a share of ceil(3 * 1d / 30d) = 1 backup is read again
    assert len(state.integrity_reads("shop")) == 3

    obj = next((sqlite_job.repo_root / "shop" / "backups" / ids[0]).glob("*.zst.age"))
    data = bytearray(obj.read_bytes())
    data[-100] ^= 0xFF
    obj.write_bytes(bytes(data))
    state.set_integrity_reads("shop", {})
    with pytest.raises(BackupdError, match="sha256 differs"):
        tasks.integrity("shop")
    assert metrics.VERIFICATION_LAST_RESULT.labels("shop")._value.get() == 0
    assert list((sqlite_job.repo_root / "shop" / "verify").glob(f"*{ids[0]}.json"))

    # A manifest that cannot be read fails the rotation too (it used to be a warning in the log only).
    (sqlite_job.repo_root / "shop" / "backups" / ids[1] / "manifest.json").write_text("{ not json")
    with pytest.raises(BackupdError, match=ids[1]):
        tasks.integrity("shop")
    assert list((sqlite_job.repo_root / "shop" / "verify").glob(f"*{ids[1]}.json"))
    ctx.close()
