"""A physical PostgreSQL backup killed with SIGKILL mid-stream leaves nothing behind once the next backup runs."""

from __future__ import annotations

import subprocess
import time

from pg_fixtures import BACKUPD_EXE, JOB, PgEnv, pg_env  # noqa: F401  (fixture)
from test_killed_backup import debris

ARCHIVE_LOGS = True
METHOD = "physical"


def test_sigkill_mid_physical_backup_then_the_next_backup_cleans_up(pg_env: PgEnv) -> None:
    pg_env.sql("CREATE TABLE filler AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS pad "
               "FROM generate_series(1, 1500000) g")
    backups = pg_env.repo / JOB / "backups"
    proc = subprocess.Popen(["runuser", "-u", "postgres", "--", str(BACKUPD_EXE), "--config", str(pg_env.config),
                             "backup", JOB], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/tmp",
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.stat().st_size > (4 << 20) for p in backups.rglob(".tmp-*")):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the backup finished before it could be killed"
        backupd = [int(pid) for pid in subprocess.run(["pgrep", "-f", "-s", str(proc.pid), "backupd"],
                                                      capture_output=True, text=True).stdout.split()]
        for pid in backupd:  # the backupd process itself (not runuser): SIGKILL leaves it no cleanup
            subprocess.run(["kill", "-KILL", str(pid)], check=False)
    finally:
        proc.wait(60)
    assert debris(backups), "the killed backup left nothing to clean up"
    pg_env.backupd("backup", JOB, check=True)
    assert debris(backups) == []
    assert pg_env.backupd("verify", JOB, "--integrity-only").code == 0
