"""Foreground commands: progress on a terminal only, and an audit event for each run."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

from core_fixtures import SqliteJob
from support import BACKUPD, REPO_ROOT, run_backupd
from test_killed_backup import big_db


def run_with_tty_stderr(*args: str, config: Path) -> tuple[int, str, str]:
    """Run backupd with stderr on a pseudo-terminal (stdout stays a pipe)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([*BACKUPD, "--config", str(config), "--log-format", "json", *args],
                                cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        out = proc.stdout.read().decode()
        proc.stdout.close()
        code = proc.wait(120)
    finally:
        os.close(master)
    return code, out, b"".join(chunks).decode(errors="replace")


def test_progress_on_a_tty_and_nothing_otherwise(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    big_db(sqlite_job.db, 24)
    code, out, tty = run_with_tty_stderr("backup", "shop", config=sqlite_job.config)
    assert code == 0, tty
    backup_id = out.strip()
    assert "\r\x1b[Kbackup shop: " in tty and "MiB/s" in tty
    assert tty.rstrip("\r\n").endswith("\x1b[K")  # the progress line is erased at the end

    code, _, tty = run_with_tty_stderr("restore", "shop", "--to", str(tmp_path / "restored.sqlite3"),
                                       config=sqlite_job.config)
    assert code == 0, tty
    assert "\r\x1b[Krestore shop: " in tty and " of " in tty and "ETA" in tty

    piped = run_backupd("verify", "shop", config=sqlite_job.config)
    assert piped.code == 0
    assert "\r" not in piped.err and "MiB/s" not in piped.err
    assert piped.out.startswith(backup_id)


def test_audit_log_records_commands_and_ships_them(sqlite_job: SqliteJob) -> None:
    backup_id = run_backupd("backup", "shop", config=sqlite_job.config, check=True).out.strip()
    assert run_backupd("verify", "shop", "--backup", "20000101T000000Z", config=sqlite_job.config).code == 1
    assert run_backupd("list", config=sqlite_job.config).code == 0  # read-only: not audited
    assert run_backupd("keys", "generate", config=sqlite_job.config).code == 0

    lines = (sqlite_job.state_dir / "audit.log").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert [(e["command"], e["job"], e["backup_id"], e["result"]) for e in events] == [
        ("backup", "shop", backup_id, "success"),
        ("verify", "shop", "20000101T000000Z", "failure"),
        ("keys generate", None, None, "success"),
    ]
    assert "backup 20000101T000000Z not found" in events[1]["detail"]
    assert all(e["user"] and e["host"] and e["trigger"] == "cli" and e["time"].endswith("Z") for e in events)
    shipped = sorted((sqlite_job.repo_root / "shop" / "audit").glob("*.json"))
    assert [json.loads(p.read_text())["command"] for p in shipped] == ["backup", "verify"]
