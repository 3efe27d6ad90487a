"""What an operator reads: `show` without Python reprs, `list` with the PITR window in order, and
stderr on a pipe where log lines and the error message never share a line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from core_fixtures import SqliteJob
from support import REPO_ROOT, run_backupd


def _rewrite_metadata(sqlite_job: SqliteJob, backup_id: str, extra: dict[str, object]) -> None:
    assert sqlite_job.repo_root is not None
    path = sqlite_job.repo_root / "shop" / "backups" / backup_id / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["metadata"].update(extra)
    path.write_text(json.dumps(manifest))
    # the index is derived from the manifests (written once): after an edit in place, rebuilt from them
    (sqlite_job.repo_root / "shop" / "index.json").unlink(missing_ok=True)


def test_show_prints_nested_metadata_as_text_not_python_reprs(sqlite_job: SqliteJob) -> None:
    backup_id = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    _rewrite_metadata(sqlite_job, backup_id, {
        "binlog": {"file": "mysql-bin.000003", "position": 1234, "gtid": None},
        "databases": ["shop", "billing"],
        "tablespaces": [{"name": "fast", "location": "/ssd"}],
        "pitr": {"from": "2026-11-24T02:00:00Z", "log_kind": "binlog"},
        "standby": False,
    })
    out = run_backupd("show", backup_id, config=sqlite_job.config, check=True).out
    for repr_mark in ("{'", "['", "None", "False", "True"):
        assert repr_mark not in out, out
    lines = [line.strip() for line in out.splitlines()]
    assert "binlog.file  mysql-bin.000003" in lines
    assert "binlog.position  1234" in lines
    assert "binlog.gtid  -" in lines
    assert "databases  shop, billing" in lines
    assert 'tablespaces  [{"location": "/ssd", "name": "fast"}]' in lines
    assert "pitr.log_kind  binlog" in lines
    assert "standby  no" in lines


def test_list_shows_the_pitr_window_start_before_its_end(sqlite_job: SqliteJob) -> None:
    backup_id = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    # the newest archived log was shipped before the backup's consistent point (nothing archived since)
    assert sqlite_job.repo_root is not None
    log = sqlite_job.repo_root / "shop" / "binlog" / "1" / "mysql-bin.000001.zst.age"
    log.parent.mkdir(parents=True)
    log.write_bytes(b"x")
    os.utime(log, (1795824000, 1795824000))  # 2026-11-28T00:00:00Z
    _rewrite_metadata(sqlite_job, backup_id, {"pitr": {"from": "2026-12-01T00:00:00Z", "log_kind": "binlog"}})

    listed = json.loads(run_backupd("list", "--json", config=sqlite_job.config, check=True).out)["backups"]
    assert listed[0]["pitr"] == {"from": "2026-12-01T00:00:00Z", "to": "2026-12-01T00:00:00Z", "log_kind": "binlog",
                                 "broken_at": None, "notes": []}
    table = run_backupd("list", config=sqlite_job.config, check=True).out
    assert "2026-12-01T00:00:00Z .. 2026-12-01T00:00:00Z" in table

    os.utime(log, (1796256000, 1796256000))  # 2026-12-03T00:00:00Z: a log archived after the backup
    table = run_backupd("list", config=sqlite_job.config, check=True).out
    assert "2026-12-01T00:00:00Z .. 2026-12-03T00:00:00Z" in table


INTERLEAVE = """
import threading
import structlog
from backupd import logs
from backupd.cli.main import report
from backupd.errors import DriverError

logs.configure("json", "info")
log = structlog.get_logger("test")
stop = threading.Event()

def background() -> None:
    while not stop.is_set():
        log.info("background work", step=1)

threads = [threading.Thread(target=background) for _ in range(2)]
for thread in threads:
    thread.start()
for i in range(3000):
    report(DriverError(f"pg_dump exited with status 1: failure {i}", hint="run `backupd check shop`"))
stop.set()
for thread in threads:
    thread.join()
"""


def test_on_a_pipe_log_lines_and_the_error_message_do_not_interleave() -> None:
    proc = subprocess.run([sys.executable, "-c", INTERLEAVE], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, check=True)
    errors = hints = 0
    for line in proc.stderr.splitlines():
        if line.startswith("{"):
            assert json.loads(line)["event"] == "background work", line
        elif line.startswith("backupd: error: "):
            assert line.count("backupd:") == 1 and "{" not in line, line
            errors += 1
        else:
            assert line == "hint: run `backupd check shop`", line
            hints += 1
    assert errors == hints == 3000
