"""Secrets and modes on the host: umask 077 whoever starts backupd, key files, secret file checks, DSNs."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from backupd.redact import describe_url, redact, url_password_problem
from core_fixtures import Keys, SqliteJob
from daemon_support import start_daemon  # noqa: F401 (fixture)
from s3_server import free_port
from support import error_lines, run_backupd, write_config


def modes_under(root: Path) -> dict[Path, int]:
    """Every directory and file under ``root`` (itself included), with its permission bits."""
    found = {root: stat.S_IMODE(root.stat().st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            found[path] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_private(root: Path) -> None:
    """Directories 0700, files 0600, sockets reachable by no one else: nothing for group or others to read."""
    wrong = []
    for path, mode in modes_under(root).items():
        kind = path.lstat().st_mode
        if stat.S_ISDIR(kind):
            ok = mode == 0o700
        elif stat.S_ISREG(kind):
            ok = mode == 0o600
        else:
            ok = mode & 0o007 == 0
        if not ok:
            wrong.append(f"{path} {mode:04o}")
    assert not wrong, "created with a group/world mode under umask 022:\n" + "\n".join(wrong)


def wal_config(tmp_path: Path, keys: Keys, state: Path) -> Path:
    data_dir = tmp_path / "pgdata"
    (data_dir / "pg_wal" / "archive_status").mkdir(parents=True)
    return write_config(tmp_path / "wal.toml", {
        "daemon": {"state_dir": str(state)},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "walrepo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.pg": {"driver": "postgres", "dsn": "postgresql://postgres@127.0.0.1:1/x", "storage": "main",
                    "archive_logs": True, "data_dir": str(data_dir)},
    })


def test_everything_backupd_creates_is_private_under_umask_022(sqlite_job: SqliteJob, keys: Keys, tmp_path: Path,
                                                               start_daemon) -> None:  # noqa: F811
    os.umask(0o022)  # as a shell, cron or a careless unit would start it; the children inherit it
    config, state = sqlite_job.config, sqlite_job.state_dir
    backup_id = run_backupd("backup", "shop", config=config, check=True).out.strip()
    assert run_backupd("verify", "shop", config=config).code == 0
    run_backupd("list", config=config, check=True)
    restored = tmp_path / "out" / "restored.sqlite3"
    restored.parent.mkdir()
    run_backupd("restore", "shop", "--to", str(restored), "--backup", backup_id, config=config, check=True)
    assert stat.S_IMODE(restored.stat().st_mode) == 0o600
    assert run_backupd("backup", "nosuchjob", config=config).code == 2  # a failed command is audited too

    # wal-push, then wal-fetch, whose background prefetcher decrypts the next segments into the spool
    wal = wal_config(tmp_path, keys, state)
    segments = [f"0000000100000000000000{n:02X}" for n in range(0x10, 0x14)]
    for name in segments:
        path = tmp_path / "pgdata" / "pg_wal" / name
        path.write_bytes(os.urandom(8192))
        run_backupd("wal-push", "--no-daemon", "--job", "pg", str(path), config=wal, check=True)
    fetched = tmp_path / "pgdata" / "pg_wal" / "RECOVERYXLOG"
    run_backupd("wal-fetch", "--job", "pg", segments[0], str(fetched), config=wal, check=True)
    spool = state / "spool" / "pg" / "wal-fetch"
    deadline = time.monotonic() + 30
    while not (spool / segments[1]).exists():
        assert time.monotonic() < deadline, f"the prefetcher spooled nothing: {sorted(os.listdir(spool))}"
        time.sleep(0.05)
    assert stat.S_IMODE((spool / segments[1]).stat().st_mode) == 0o600  # decrypted WAL

    # the daemon: its state, control socket and audit trail
    port = free_port()
    daemon = start_daemon(config, port, env={"BACKUPD_DAEMON__METRICS_LISTEN": f"127.0.0.1:{port}"})
    daemon.wait_ready()
    socket = state / "control.sock"
    assert stat.S_IMODE(socket.stat().st_mode) & 0o007 == 0
    assert daemon.stop() == 0

    assert_private(state)
    assert_private(sqlite_job.repo_root)
    assert_private(tmp_path / "walrepo")


def test_keys_generate_writes_a_new_0600_file_and_never_overwrites(tmp_path: Path) -> None:
    os.umask(0o022)
    key = tmp_path / "identity.txt"
    made = run_backupd("keys", "generate", "-o", str(key), check=True)
    assert made.out == ""  # the private key goes to the file only
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    text = key.read_text()
    assert "AGE-SECRET-KEY-1" in text and "# public key: age1" in text
    assert "Public key: age1" in made.err
    again = run_backupd("keys", "generate", "-o", str(key))
    assert again.code == 2
    assert f"{key}: file exists; refusing to overwrite a key file" in again.err
    assert key.read_text() == text
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "elsewhere.txt")
    assert run_backupd("keys", "generate", "-o", str(link)).code == 2  # not written through a symlink
    assert not (tmp_path / "elsewhere.txt").exists()
    age = subprocess.run(["age-keygen", "-y", str(key)], capture_output=True, text=True)
    if age.returncode == 0:  # the file is what age-keygen itself would have written
        assert age.stdout.strip() in made.err


def test_check_fails_on_secret_files_others_can_read(sqlite_job: SqliteJob, tmp_path: Path) -> None:
    pass_file = tmp_path / "db.pass"
    pass_file.write_text("hunter2\n")
    pass_file.chmod(0o600)
    config = write_config(tmp_path / "c.toml", {
        "daemon": {"state_dir": str(sqlite_job.state_dir)},
        "storage.main": {"type": "filesystem", "path": str(sqlite_job.repo_root)},
        "encryption": {"recipients": [sqlite_job.keys.recipient], "identity_file": str(sqlite_job.keys.identity_file)},
        "jobs.pg": {"driver": "postgres", "dsn": "postgresql://backup@127.0.0.1:1/orders", "storage": "main",
                    "password_file": str(pass_file)},
    })
    before = run_backupd("check", "pg", config=config).out
    assert f"ok    encryption.identity_file mode: {sqlite_job.keys.identity_file}: mode 0600" in before
    assert f"ok    jobs.pg.password_file mode: {pass_file}: mode 0600" in before

    sqlite_job.keys.identity_file.chmod(0o644)
    pass_file.chmod(0o640)
    sqlite_job.state_dir.mkdir(exist_ok=True)
    sqlite_job.state_dir.chmod(0o755)
    result = run_backupd("check", "pg", config=config)
    assert result.code == 1
    assert (f"warn  daemon.state_dir: {sqlite_job.state_dir} is accessible by group or others (mode 0755); "
            f"backupd creates it 0700: run `chmod 700 {sqlite_job.state_dir}`") in result.out
    assert (f"FAIL  encryption.identity_file mode: identity file {sqlite_job.keys.identity_file} is accessible by "
            f"group or others (mode 0644); run `chmod 600 {sqlite_job.keys.identity_file}`") in result.out
    assert (f"FAIL  jobs.pg.password_file mode: password file {pass_file} is accessible by group or others "
            "(mode 0640)") in result.out
    assert "hunter2" not in result.out + result.err


@pytest.mark.parametrize("password", ["pa/ss", "p@ss/w:rd", "plain", "x?y#z"])
def test_a_password_in_a_url_is_refused_and_never_echoed(sqlite_job: SqliteJob, tmp_path: Path, password: str) -> None:
    config = write_config(tmp_path / "c.toml", {
        "daemon": {"state_dir": str(sqlite_job.state_dir)},
        "storage.main": {"type": "filesystem", "path": str(sqlite_job.repo_root)},
        "encryption": {"recipients": [sqlite_job.keys.recipient]},
        "jobs.pg": {"driver": "postgres", "dsn": f"postgresql://backup:{password}@db.example:5433/orders",
                    "storage": "main"},
    })
    result = run_backupd("backup", "pg", config=config)
    assert result.code == 2
    lines = error_lines(result.err)
    assert ("  jobs.pg.dsn: the URL carries a password (user:password@); put the password in password_file instead "
            "(or the environment) (got postgresql://db.example:5433/orders)") in lines, result.err
    assert password not in result.err and password not in result.out
    assert not (sqlite_job.state_dir / "audit.log").exists() or password not in (
        sqlite_job.state_dir / "audit.log").read_text()


def test_environment_dsn_with_a_password_is_refused(sqlite_job: SqliteJob) -> None:
    result = run_backupd("list", config=sqlite_job.config,
                         env={"BACKUPD_JOBS__SHOP__DSN": "postgresql://u:se/cret@h/db"})
    assert result.code == 2
    assert "jobs.shop.dsn: the URL carries a password" in result.err
    assert "se/cret" not in result.err


def test_redaction_and_description_of_urls() -> None:
    assert redact("connect to postgresql://u:pa/ss@h:5432/db failed") == "connect to postgresql://u:***@h:5432/db failed"
    assert redact("mysql://root:p@ss:w/rd@h:3306/?socket=/s") == "mysql://root:***@h:3306/?socket=/s"
    assert redact("postgresql://h/db?sslmode=require&password=x%2Fy") == \
        "postgresql://h/db?sslmode=require&password=***"
    assert redact("postgresql://u@h/db and s3://bucket/key") == "postgresql://u@h/db and s3://bucket/key"
    assert describe_url("postgresql://u:pa/ss@h:5432/db?sslmode=require") == "postgresql://h:5432/db"
    assert url_password_problem("redis://:s/ecret@localhost:6379/0")
    assert url_password_problem("postgresql://h/db?password=x")
    assert url_password_problem("mongodb://u@h1:1,h2:2/db?authSource=admin") is None
    assert url_password_problem("mysql://backup@/?socket=/run/mysqld/mysqld.sock") is None
