"""A physical backup taken from a streaming standby restores with the WAL the primary archived."""

from __future__ import annotations

import json
import subprocess
import time

from drivers.postgres.cluster import Cluster, unsandboxed
from pg_fixtures import BACKUPD_EXE, JOB, PG_BIN, PgEnv, pg_env  # noqa: F401  (fixture)

ARCHIVE_LOGS = True
METHOD = "physical"


def start_standby(env: PgEnv) -> Cluster:
    """pg_basebackup -R from the primary into a second cluster directory, started on its own port."""
    standby = Cluster(env.root / "standby", PG_BIN, unsandboxed(env.root / "standby"))
    env.restored.append(standby)  # the fixture stops it whatever happens
    standby.prepare_root()
    proc = subprocess.run(
        ["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_basebackup"), "-D", str(standby.data), "-R",
         "-X", "stream", "-c", "fast", "-h", str(env.cluster.socket_dir), "-p", str(env.cluster.port),
         "-U", "postgres", "--no-password"],
        capture_output=True, text=True, timeout=60, cwd="/tmp")
    assert proc.returncode == 0, proc.stderr
    # archive_mode=on (inherited) never archives on a standby; off makes that explicit.
    standby.configure({"archive_mode": False, "hot_standby": True})
    standby.start()
    return standby


def wait_replayed(primary: Cluster, standby: Cluster, timeout: float = 30) -> None:
    with primary.connect() as conn:
        target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    deadline = time.monotonic() + timeout
    with standby.connect() as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        while not conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (str(target),)).fetchone()[0]:
            assert time.monotonic() < deadline, f"the standby did not replay up to {target}: {standby.log_tail()}"
            time.sleep(0.1)


def test_physical_backup_from_standby_restores(pg_env: PgEnv) -> None:
    env = pg_env
    env.sql("CREATE TABLE orders (id int PRIMARY KEY, phase text NOT NULL)")
    env.sql("INSERT INTO orders SELECT g, 'base' FROM generate_series(1, 1000) g")
    env.switch_and_wait_archived()
    standby = start_standby(env)
    try:
        wait_replayed(env.cluster, standby)
        # The same job and repository, with the dsn pointing at the standby.
        standby_config = env.root / "backupd-standby.toml"
        text = env.config.read_text()
        primary_addr = f"127.0.0.1:{env.cluster.port}/"
        assert primary_addr in text
        standby_config.write_text(text.replace(primary_addr, f"127.0.0.1:{standby.port}/")
                                  .replace(str(env.cluster.data), str(standby.data)))
        standby_config.chmod(0o644)
        result = subprocess.run(
            ["runuser", "-u", "postgres", "--", str(BACKUPD_EXE), "--config", str(standby_config),
             "--log-format", "json", "backup", JOB, "--method", "physical"],
            capture_output=True, text=True, timeout=120, cwd="/tmp")
        assert result.returncode == 0, result.stderr
        backup_id = result.stdout.strip()
    finally:
        standby.stop()

    # Rows written after the backup reach the restore through the primary's archive.
    env.sql("INSERT INTO orders SELECT g, 'after' FROM generate_series(1001, 1010) g")
    env.switch_and_wait_archived()

    meta = json.loads(env.backupd("show", backup_id, "--json", check=True).out)["metadata"]
    assert meta["backup_from"] == "standby"
    assert meta["timeline"] == 1 and meta["pitr"]["first_log"] == meta["wal_range"]["first"]

    restored = env.restored_cluster("from-standby")
    out = env.backupd("restore", JOB, "--to", str(restored.data), check=True).out
    assert backup_id in out
    assert not (restored.data / "standby.signal").exists()
    env.start_restored(restored)
    try:
        with restored.connect("shop") as conn:
            rows = conn.execute("SELECT phase, count(*), sum(id) FROM orders GROUP BY phase ORDER BY phase").fetchall()
        assert rows == [("after", 10, sum(range(1001, 1011))), ("base", 1000, sum(range(1, 1001)))]
    finally:
        restored.stop()
