"""The README's install steps, followed by scripts/install.sh into a temporary prefix, give a backupd
that PostgreSQL's archive_command (running as postgres) can run: `check` passes its live WAL switch,
a physical backup is taken and listed. `check` names the missing GRANT for a role that lacks one."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from drivers.postgres.cluster import Cluster, unsandboxed
from support import REPO_ROOT, require_tool

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PASSWORD = "install-test-Pa55word"
JOB = "orders"

pytestmark = pytest.mark.slow


def mode_owner(path: Path) -> tuple[str, str, str]:
    info = path.stat()
    return oct(stat.S_IMODE(info.st_mode)), pwd.getpwuid(info.st_uid).pw_name, grp.getgrgid(info.st_gid).gr_name


def readme_grants(section: str) -> list[str]:
    """The SQL statements of one fenced block in README's PostgreSQL privileges part, by its comment."""
    text = (REPO_ROOT / "README.md").read_text()
    block = text[text.index(f"-- {section}"):]
    block = block[:block.index("```")]
    return [line.strip() for line in block.splitlines()[1:] if line.strip() and not line.startswith("--")]


@pytest.fixture(scope="module")
def prefix() -> Iterator[Path]:
    require_tool("runuser")
    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL 15 server binaries are not installed")
    root = Path(tempfile.mkdtemp(prefix="backupd-install-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "install.sh"), "--prefix", str(root),
                               "--user", "postgres", "--extras", "postgres"],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(prefix: Path) -> Iterator[Cluster]:
    backupd = prefix / "opt/backupd/venv/bin/backupd"
    config = prefix / "etc/backupd/backupd.toml"
    server = Cluster(prefix / "pg", PG_BIN, unsandboxed(prefix / "pg"))
    try:
        server.init({"wal_level": "replica", "max_wal_senders": 5, "fsync": False, "archive_mode": True,
                     "archive_command": f"{backupd} --config {config} wal-push --job {JOB} %p"})
        hba = server.data / "pg_hba.conf"
        hba.write_text("host all backup 127.0.0.1/32 scram-sha-256\n"
                       "host replication backup 127.0.0.1/32 scram-sha-256\n"
                       "host all nogrants 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        server.start()
        with server.connect() as conn:
            conn.execute("CREATE DATABASE orders")
        yield server
    finally:
        server.close()


def as_postgres(prefix: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    argv = ["runuser", "-u", "postgres", "--", str(prefix / "opt/backupd/venv/bin/backupd"),
            "--config", str(prefix / "etc/backupd/backupd.toml"), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")


def configure(prefix: Path, cluster: Cluster, user: str, method: str, archive_logs: bool) -> None:
    """The operator's part: a key, a password file and the job, in the files install.sh made."""
    etc = prefix / "etc/backupd"
    backupd = prefix / "opt/backupd/venv/bin/backupd"
    identity = etc / "identity.txt"
    if not identity.exists():
        keys = subprocess.run(["sh", "-c", f"umask 077; {backupd} keys generate > {identity}"],
                              capture_output=True, text=True, check=True)
        shutil.chown(identity, "postgres", "postgres")
        (etc / "recipient").write_text(keys.stderr.split("Public key: ")[1].strip())
    password = etc / "orders.pass"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    shutil.chown(password, "postgres", "postgres")
    config = etc / "backupd.toml"
    with open(config, "w") as handle:  # keeps the file's 0640 root:postgres
        handle.write(f"""
[daemon]
state_dir = "{prefix}/var/lib/backupd"

[storage.local]
type = "filesystem"
path = "{prefix}/var/backups/backupd"

[encryption]
recipients = ["{(etc / 'recipient').read_text()}"]
identity_file = "{identity}"

[jobs.{JOB}]
driver = "postgres"
dsn = "postgresql://{user}@127.0.0.1:{cluster.port}/orders"
password_file = "{password}"
method = "{method}"
archive_logs = {"true" if archive_logs else "false"}
data_dir = "{cluster.data}"
storage = "local"
""")


def test_install_sh_lays_out_what_the_readme_says(prefix: Path) -> None:
    assert os.access(prefix / "opt/backupd/venv/bin/backupd", os.X_OK)
    assert (prefix / "opt/backupd/README.md").read_text() == (REPO_ROOT / "README.md").read_text()
    assert os.path.realpath(prefix / "opt/backupd/venv/bin/python").startswith("/usr/bin/python3")
    assert mode_owner(prefix / "etc/backupd") == ("0o750", "root", "postgres")
    assert mode_owner(prefix / "etc/backupd/backupd.toml") == ("0o640", "root", "postgres")
    assert mode_owner(prefix / "var/lib/backupd") == ("0o700", "postgres", "postgres")
    assert mode_owner(prefix / "var/backups/backupd") == ("0o700", "postgres", "postgres")
    unit = (prefix / "etc/systemd/system/backupd.service").read_text()
    assert f"ExecStart={prefix}/opt/backupd/venv/bin/backupd --log-format json run" in unit
    assert f"Environment=BACKUPD_CONFIG={prefix}/etc/backupd/backupd.toml" in unit
    drop_in = (prefix / "etc/systemd/system/backupd.service.d/user.conf").read_text()
    assert "User=postgres\nGroup=postgres\n" in drop_in
    # postgres runs the installed command (no pyenv build under /root in the way)
    version = subprocess.run(["runuser", "-u", "postgres", "--", str(prefix / "opt/backupd/venv/bin/backupd"),
                              "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("backupd "), version.stderr


def test_check_names_the_missing_grants(prefix: Path, cluster: Cluster) -> None:
    with cluster.connect() as conn:
        conn.execute(f"CREATE ROLE nogrants LOGIN PASSWORD '{PASSWORD}'")
    configure(prefix, cluster, "nogrants", "physical", archive_logs=True)
    result = as_postgres(prefix, "check", JOB)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any("ALTER ROLE nogrants REPLICATION;" in line for line in lines), result.stdout
    assert any("GRANT pg_read_all_settings TO nogrants;" in line for line in lines), result.stdout
    assert any("GRANT EXECUTE ON FUNCTION pg_switch_wal() TO nogrants;" in line and "database orders" in line
               for line in lines), result.stdout

    configure(prefix, cluster, "nogrants", "logical", archive_logs=False)
    result = as_postgres(prefix, "check", JOB)
    assert result.returncode == 1
    assert any("GRANT pg_read_all_data TO nogrants;" in line for line in result.stdout.splitlines()), result.stdout


def test_readme_grants_give_a_working_archive_command_and_backup(prefix: Path, cluster: Cluster) -> None:
    with cluster.connect() as conn:
        conn.execute(f"CREATE ROLE backup LOGIN PASSWORD '{PASSWORD}'")
        for statement in readme_grants("the role, as a superuser, in any database"):
            conn.execute(statement)
    with cluster.connect("orders") as conn:
        for statement in readme_grants("archive_logs = true, as a superuser, in the job's database"):
            conn.execute(statement)
    configure(prefix, cluster, "backup", "physical", archive_logs=True)

    checked = as_postgres(prefix, "check", JOB)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "arrived in storage" in checked.stdout  # archive_command (as postgres) pushed a segment

    backup = as_postgres(prefix, "backup", JOB)
    assert backup.returncode == 0, backup.stderr
    listed = as_postgres(prefix, "list", JOB)
    assert backup.stdout.strip() in listed.stdout
    with cluster.connect() as conn:
        archived, failed = conn.execute("SELECT archived_count, failed_count FROM pg_stat_archiver").fetchone()
    assert archived >= 2 and failed == 0

    configure(prefix, cluster, "backup", "logical", archive_logs=False)
    assert as_postgres(prefix, "check", JOB).returncode == 0
    logical = as_postgres(prefix, "backup", JOB)
    assert logical.returncode == 0, logical.stderr
