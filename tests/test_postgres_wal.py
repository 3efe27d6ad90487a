"""WAL archiving: naming and gap detection, wal-push semantics and faults, the daemon fast path and push-ahead."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from backupd import control
from backupd.context import JobContext
from backupd.repository import Layout
from backupd.settings import load_settings
from drivers.postgres.walnames import (Switch, archive_name, format_lsn, missing_segments, parse_history,
                                       parse_lsn, segment_name)
from pg_fixtures import BACKUPD_EXE, JOB, PgEnv, pg_env  # noqa: F401  (fixture)

ARCHIVE_LOGS = True
METHOD = "physical"
SEG = 16 * 1024 * 1024


# -- pure functions ---------------------------------------------------------------------

def test_names_and_lsns() -> None:
    assert archive_name("000000010000000000000003") == "00000001/000000010000000000000003"
    assert archive_name("00000002.history") == "00000002/00000002.history"
    assert archive_name("000000010000000000000003.00000028.backup").startswith("00000001/")
    with pytest.raises(ValueError):
        archive_name("../etc/passwd")
    assert format_lsn(parse_lsn("1/2000028")) == "1/2000028"
    assert segment_name(1, 0x1FF, SEG) == "0000000100000001000000FF"


def test_gap_detection_follows_timelines() -> None:
    names = [segment_name(1, n, SEG) for n in (3, 4, 6)] + [segment_name(2, n, SEG) for n in (6, 7, 9)]
    history = {2: parse_history("1\t0/6000100\tno recovery target specified\n")}
    assert history[2] == [Switch(1, 0x6000100)]
    missing = missing_segments(1, 3, names, history, SEG)
    assert missing == [segment_name(1, 5, SEG), segment_name(2, 8, SEG)]
    assert missing_segments(1, 3, names[:2], {}, SEG) == []


# -- against a live cluster --------------------------------------------------------------

def segment_file(env: PgEnv, name: str, size: int = SEG, where: Path | None = None) -> Path:
    """A fake segment inside the cluster's data directory (wal-push takes only its own cluster's files).

    Its first page header is zero: no system identifier to compare."""
    path = (where or fake_wal(env)) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(40) + os.urandom(size - 40))
    return path


def fake_wal(env: PgEnv) -> Path:
    return env.cluster.data / "backupd-test-wal"


def stored(env: PgEnv, name: str) -> Path:
    return env.repo / Layout(JOB).log_key("wal", archive_name(name))


def fetch(env: PgEnv, name: str) -> bytes:
    dest = env.root / f"fetched-{name}"
    env.backupd("wal-fetch", "--job", JOB, name, str(dest), as_postgres=False, check=True)
    return dest.read_bytes()


def test_same_name_identical_ok_other_content_refused(pg_env: PgEnv) -> None:
    name = "0000000700000000000000F1"
    path = segment_file(pg_env, name)
    pg_env.backupd("wal-push", str(path), "--job", JOB, "--no-daemon", as_postgres=False, check=True)
    pg_env.backupd("wal-push", str(path), "--job", JOB, "--no-daemon", as_postgres=False, check=True)
    original = path.read_bytes()
    path.write_bytes(bytes(40) + os.urandom(SEG - 40))
    result = pg_env.backupd("wal-push", str(path), "--job", JOB, "--no-daemon", as_postgres=False)
    assert result.code == 1 and "different content" in result.err
    assert fetch(pg_env, name) == original


def test_wal_fetch_missing_segment_exits_1(pg_env: PgEnv) -> None:
    result = pg_env.backupd("wal-fetch", "--job", JOB, "0000000700000000000000EE", str(pg_env.root / "x"),
                            as_postgres=False)
    assert result.code == 1 and "not in the archive" in result.err


def test_sigkill_mid_upload_then_retry(pg_env: PgEnv) -> None:
    name = "0000000800000000000000F2"
    path = segment_file(pg_env, name, 8 * SEG)  # big enough to catch it mid-upload
    argv = [str(BACKUPD_EXE), "--config", str(pg_env.config), "wal-push", str(path), "--job", JOB, "--no-daemon"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tl_dir = stored(pg_env, name).parent
    deadline = time.monotonic() + 60
    while not (tl_dir.is_dir() and any(p.name.startswith(".tmp-") for p in tl_dir.iterdir())):
        assert proc.poll() is None, "wal-push finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not stored(pg_env, name).exists()  # nothing half-written is visible under the name
    pg_env.backupd("wal-push", str(path), "--job", JOB, "--no-daemon", as_postgres=False, check=True)
    assert fetch(pg_env, name) == path.read_bytes()


def test_storage_down_keeps_segment_then_archives(pg_env: PgEnv) -> None:
    pg_env.switch_and_wait_archived()
    wal_dir = pg_env.repo / JOB / "wal" / "00000001"
    wal_dirs = [wal_dir, *(p for p in wal_dir.iterdir() if p.is_dir())]  # the timeline and its WAL folders
    for folder in wal_dirs:
        os.chmod(folder, 0o500)  # postgres can no longer write: storage "down"
    try:
        with pg_env.cluster.connect() as conn:
            failed_before = conn.execute("SELECT failed_count FROM pg_stat_archiver").fetchone()[0]
            conn.execute("SELECT txid_current()")
            segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
            deadline = time.monotonic() + 60
            while conn.execute("SELECT failed_count FROM pg_stat_archiver").fetchone()[0] == failed_before:
                assert time.monotonic() < deadline, "archive_command never failed"
                time.sleep(0.1)
        ready = pg_env.cluster.data / "pg_wal" / "archive_status" / f"{segment}.ready"
        assert ready.exists() and (pg_env.cluster.data / "pg_wal" / segment).exists()
        assert not stored(pg_env, segment).exists()
    finally:
        for folder in wal_dirs:
            os.chmod(folder, 0o755)
    with pg_env.cluster.connect() as conn:  # a new segment wakes the archiver, which retries the old one first
        conn.execute("SELECT txid_current()")
        conn.execute("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 90
        while not stored(pg_env, segment).exists():
            assert time.monotonic() < deadline, "segment never archived after storage came back"
            time.sleep(0.2)
    assert pg_env.backupd("wal-fetch", "--job", JOB, segment, str(pg_env.root / "back"), as_postgres=False).code == 0


def test_daemon_fast_path_and_push_ahead(pg_env: PgEnv, tmp_path: Path) -> None:
    settings = load_settings(pg_env.config)
    ctx = JobContext(settings, JOB)
    driver = ctx.driver
    calls: list[dict] = []
    handler = driver.control_handlers()["wal-push"]

    def counting(message: dict) -> dict:
        calls.append(message)
        return handler(message)

    server = control.ControlServer(control.socket_path(pg_env.state_dir), {"wal-push": counting})
    server.start()
    try:
        name = "0000000900000000000000F3"
        path = segment_file(pg_env, name)
        pg_env.backupd("wal-push", str(path), "--job", JOB, as_postgres=False, check=True)
        assert [c["path"] for c in calls] == [str(path)] and stored(pg_env, name).exists()
        # Push-ahead: a fake pg_wal with one .ready segment (inside the job's data_dir: only its WAL is taken).
        data = fake_wal(pg_env) / "data"
        (data / "pg_wal" / "archive_status").mkdir(parents=True)
        ahead = "0000000900000000000000F4"
        (data / "pg_wal" / ahead).write_bytes(bytes(40) + os.urandom(SEG - 40))
        ready = data / "pg_wal" / "archive_status" / f"{ahead}.ready"
        ready.touch()
        archiver = type(driver.log_archivers()[0])(driver.pusher, data, workers=2, poll=0.05)
        pending: dict = {}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            deadline = time.monotonic() + 30
            while not driver.pusher.pushed(archive_name(ahead)):
                archiver.run_once(pool, pending)
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert ready.exists(), "the archiver must never rename .ready files"
        assert stored(pg_env, ahead).exists()
        started = time.monotonic()
        reply = control.request(control.socket_path(pg_env.state_dir),
                                {"op": "wal-push", "job": JOB, "path": str(data / "pg_wal" / ahead)})
        assert reply == {"ok": True, "name": archive_name(ahead), "status": "identical"}
        assert time.monotonic() - started < 2
        other = control.request(control.socket_path(pg_env.state_dir), {"op": "wal-push", "job": "x", "path": "/x"})
        assert other is not None and other["ok"] is False
    finally:
        server.stop()
        ctx.close()


def test_wal_fetch_prefetches_in_the_background(pg_env: PgEnv) -> None:
    """After one fetch, the next segments arrive in the spool without being asked for,
    and are then served from it even with storage unreachable."""
    names = [f"0000000A00000000000000{n:02X}" for n in range(0x10, 0x16)]
    for name in names:
        pg_env.backupd("wal-push", str(segment_file(pg_env, name)), "--job", JOB, "--no-daemon", check=True)
    contents = {name: (fake_wal(pg_env) / name).read_bytes() for name in names}
    spool = pg_env.state_dir / "spool" / JOB / "wal-fetch"
    first = pg_env.root / "got-first"
    pg_env.backupd("wal-fetch", "--job", JOB, names[0], str(first), as_postgres=False, check=True)
    assert first.read_bytes() == contents[names[0]]
    deadline = time.monotonic() + 60
    while not all((spool / name).exists() for name in names[1:]):
        assert time.monotonic() < deadline, f"prefetch did not fill the spool: {sorted(os.listdir(spool))}"
        time.sleep(0.05)
    tl_dir = stored(pg_env, names[0]).parent
    away = tl_dir.with_name("moved-away")
    tl_dir.rename(away)  # the archive no longer holds them: only the spool can serve now
    try:
        for name in names[1:]:
            dest = pg_env.root / f"got-{name}"
            pg_env.backupd("wal-fetch", "--job", JOB, name, str(dest), as_postgres=False, check=True)
            assert dest.read_bytes() == contents[name]
    finally:
        away.rename(tl_dir)


def test_only_the_jobs_own_cluster_may_push(pg_env: PgEnv) -> None:
    """A restored copy (or any other cluster) running wal-push --job JOB is refused: exit 1, nothing stored."""
    outside = segment_file(pg_env, "0000000A00000000000000F5", where=pg_env.root / "copy" / "pg_wal")
    result = pg_env.backupd("wal-push", str(outside), "--job", JOB, "--no-daemon", as_postgres=False)
    assert result.code == 2 and "is not in job pg's data directory" in result.err, result.err
    escape = fake_wal(pg_env) / ".." / ".." / "copy" / "pg_wal" / outside.name
    assert pg_env.backupd("wal-push", str(escape), "--job", JOB, "--no-daemon", as_postgres=False).code == 2
    assert not stored(pg_env, outside.name).exists()

    foreign = segment_file(pg_env, "0000000A00000000000000F6")
    with open(foreign, "r+b") as handle:  # a long page header carrying another system identifier
        handle.write((0xD110).to_bytes(2, "little") + (2).to_bytes(2, "little") + bytes(20)
                     + (123456789).to_bytes(8, "little"))
    result = pg_env.backupd("wal-push", str(foreign), "--job", JOB, "--no-daemon", as_postgres=False)
    assert result.code == 2 and "system identifier 123456789" in result.err, result.err
    assert not stored(pg_env, foreign.name).exists()
