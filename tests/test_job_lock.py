"""One lock per job across processes: a manual backup never runs beside a scheduled one."""

from __future__ import annotations

import threading
import time

from backupd.locks import job_lock
from backupd.redact import redact
from core_fixtures import SqliteJob
from support import run_backupd


def test_second_backup_of_a_running_job_fails_clearly(sqlite_job: SqliteJob) -> None:
    with job_lock(sqlite_job.state_dir, "shop"):
        result = run_backupd("backup", "shop", config=sqlite_job.config)
    assert result.code == 1
    assert "job shop is already running in process" in result.err
    assert "--wait" in result.err
    assert run_backupd("backup", "shop", config=sqlite_job.config).code == 0


def test_wait_takes_the_lock_once_it_is_free(sqlite_job: SqliteJob) -> None:
    released = threading.Event()

    def hold() -> None:
        with job_lock(sqlite_job.state_dir, "shop"):
            time.sleep(1.0)
        released.set()

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.1)
    result = run_backupd("backup", "shop", "--wait", "30", config=sqlite_job.config)
    holder.join()
    assert released.is_set()
    assert result.code == 0 and result.out.strip()


def test_passwords_are_redacted_from_urls_and_pairs() -> None:
    assert redact("postgresql://backup:s3cr3t@db:5432/orders") == "postgresql://backup:***@db:5432/orders"
    assert redact("mysql://root:pw@127.0.0.1:3306/") == "mysql://root:***@127.0.0.1:3306/"
    assert redact("host=db password=s3cr3t user=x") == "host=db password=*** user=x"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
