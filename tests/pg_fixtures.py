"""Throwaway PostgreSQL clusters for the postgres driver's tests (initdb as the postgres OS user).

Everything the cluster's archive_command touches (config, identity, state dir,
repository) lives in one directory under /tmp owned by postgres, and backupd
runs as postgres, as it would on a database host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest

from backupd import age
from drivers.postgres.cluster import Cluster, chown_tree, unsandboxed
from support import REPO_ROOT, Result, require_tool, write_config

PG_BIN = Path("/usr/lib/postgresql/15/bin")
BACKUPD_EXE = REPO_ROOT / ".venv" / "bin" / "backupd"
PASSWORD = "s3cret-Pa55word-never-in-argv"
JOB = "pg"


@dataclass
class PgEnv:
    root: Path
    cluster: Cluster
    config: Path
    identity: Path
    archive_logs: bool
    restored: list[Cluster] = field(default_factory=list)

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def backupd(self, *args: str, as_postgres: bool = True, timeout: float = 180, check: bool = False) -> Result:
        argv = [str(BACKUPD_EXE), "--config", str(self.config), "--log-format", "json", *args]
        if as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/tmp")
        if check and proc.returncode != 0:
            raise AssertionError(f"backupd {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def connect(self, dbname: str = "shop") -> psycopg.Connection:
        return self.cluster.connect(dbname)

    def sql(self, query: str, params: Any = None, dbname: str = "shop") -> list[tuple]:
        with self.connect(dbname) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def switch_and_wait_archived(self, cluster: Cluster | None = None, timeout: float = 60) -> str:
        """Close the current WAL segment and wait until PostgreSQL reports it archived."""
        cluster = cluster or self.cluster
        with cluster.connect() as conn:
            conn.execute("SELECT txid_current()")
            segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
            deadline = time.monotonic() + timeout
            while True:
                last, failed = conn.execute(
                    "SELECT last_archived_wal, failed_count FROM pg_stat_archiver").fetchone()
                if last and last[:24] >= segment and last[:8] == segment[:8]:
                    return segment
                if time.monotonic() > deadline:
                    raise AssertionError(f"{segment} not archived in {timeout}s; server log: {cluster.log_tail()}")
                time.sleep(0.1)

    def restored_cluster(self, name: str) -> Cluster:
        """A Cluster object for a directory `backupd restore` will write (root/<name>/data)."""
        cluster = Cluster(self.root / name, PG_BIN, unsandboxed(self.root / name))
        self.restored.append(cluster)
        return cluster

    def start_restored(self, cluster: Cluster, archive: bool = False) -> None:
        cluster.prepare_root()
        cluster.configure({"archive_mode": archive})
        cluster.start()
        cluster.wait_promoted()


def make_keys(root: Path) -> tuple[Path, str]:
    identity = age.X25519Identity.generate()
    path = root / "identity.txt"
    path.write_text(f"# test key\n{identity}\n")
    path.chmod(0o600)
    return path, str(identity.to_recipient())


@pytest.fixture(scope="module")
def pg_env(request: pytest.FixtureRequest) -> Iterator[PgEnv]:
    """A running cluster with WAL archived through `backupd wal-push` (module attribute ARCHIVE_LOGS)."""
    require_tool("pg_dump")
    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL 15 server binaries are not installed")
    archive_logs = getattr(request.module, "ARCHIVE_LOGS", True)
    method = getattr(request.module, "METHOD", "physical")
    root = Path(tempfile.mkdtemp(prefix="backupd-pg-", dir="/tmp"))
    os.chmod(root, 0o755)
    cluster = Cluster(root / "pg", PG_BIN, unsandboxed(root / "pg"))
    identity, recipient = make_keys(root)
    config = write_config(root / "backupd.toml", {
        "daemon": {"state_dir": str(root / "state")},
        "storage.main": {"type": "filesystem", "path": str(root / "repo")},
        "encryption": {"recipients": [recipient], "identity_file": str(identity)},
        f"jobs.{JOB}": {"driver": "postgres", "dsn": f"postgresql://backup@127.0.0.1:{cluster.port}/shop",
                        "password_file": str(root / "pg.pass"), "storage": "main", "method": method,
                        "archive_logs": archive_logs, "data_dir": str(cluster.data), "os_user": "postgres",
                        "verify": {"checks": ["SELECT count(*) > 0 FROM pg_class"]}},
    })
    (root / "pg.pass").write_text(PASSWORD + "\n")
    (root / "pg.pass").chmod(0o600)
    for sub in ("repo", "state", f"repo/{JOB}/wal", f"repo/{JOB}/backups"):
        (root / sub).mkdir(parents=True, exist_ok=True)  # postgres-owned even if root writes there first
    chown_tree(root, "postgres")
    env = PgEnv(root, cluster, config, identity, archive_logs)
    settings: dict[str, Any] = {"wal_level": "replica", "max_wal_senders": 5, "fsync": False}
    if archive_logs:
        settings.update(archive_mode=True, archive_command=(
            f"{BACKUPD_EXE} --config {config} --log-format json wal-push --job {JOB} %p"))
    try:
        cluster.init(settings)
        hba = cluster.data / "pg_hba.conf"
        hba.write_text("host all backup 127.0.0.1/32 scram-sha-256\n"
                       "host replication backup 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        cluster.start()
        with cluster.connect() as conn:
            conn.execute(f"CREATE ROLE backup LOGIN REPLICATION PASSWORD '{PASSWORD}' IN ROLE pg_read_all_data")
            conn.execute("GRANT EXECUTE ON FUNCTION pg_switch_wal() TO backup")
            conn.execute("CREATE DATABASE shop")
        with cluster.connect("shop") as conn:  # functions are per database: the job's own
            conn.execute("GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO backup")
            conn.execute("GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO backup")
        yield env
    finally:
        for restored in env.restored:
            restored.close()
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)
