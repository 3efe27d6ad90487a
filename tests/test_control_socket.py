"""The daemon's control socket serves only trusted uids, and file requests stay inside the job's data_dir."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from backupd import control
from core_fixtures import Keys
from daemon_support import start_daemon  # noqa: F401 (fixture)
from s3_server import free_port
from support import write_config

CLIENT = """
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.sendall(json.dumps({"op": "echo", "data": "hello"}).encode() + b"\\n")
sock.shutdown(socket.SHUT_WR)
print(sock.recv(65536).decode())
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every local user can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="backupd-ctl-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_user(user: str, *argv: str) -> str:
    import subprocess

    if os.geteuid() != 0 or not shutil.which("runuser"):
        pytest.skip("needs root and runuser to act as a second uid")
    proc = subprocess.run(["runuser", "-u", user, "--", "/usr/bin/python3", *argv], capture_output=True, text=True,
                          timeout=30, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_another_uid_is_refused_even_when_the_socket_mode_lets_it_connect(shared_dir: Path) -> None:
    path = shared_dir / "control.sock"
    served: list[dict] = []
    server = control.ControlServer(path, {"echo": lambda m: served.append(m) or {"ok": True, "echo": m["data"]}})
    server.start()
    try:
        path.chmod(0o666)  # an operator opened it up: the kernel's word on the peer still decides
        assert control.request(path, {"op": "echo", "data": "hi"}) == {"ok": True, "echo": "hi"}  # our own uid
        reply = json.loads(as_user("nobody", "-c", CLIENT, str(path)))
    finally:
        server.stop()
    nobody = int(as_user("nobody", "-c", "import os; print(os.getuid())"))
    assert reply["ok"] is False and "fallback" in reply
    assert reply["error"].startswith(f"refused: uid {nobody} (nobody) may not use this daemon's control socket")
    assert served == [{"op": "echo", "data": "hi"}], "the refused client's request reached a handler"


def test_the_clusters_user_is_trusted(shared_dir: Path) -> None:
    data_dir = shared_dir / "data"
    data_dir.mkdir()
    nobody = int(as_user("nobody", "-c", "import os; print(os.getuid())"))
    os.chown(data_dir, nobody, -1)
    path = shared_dir / "control.sock"
    server = control.ControlServer(path, {"echo": lambda m: {"ok": True, "echo": m["data"]}},
                                   peers=control.job_peers(None, data_dir))
    server.start()
    try:
        path.chmod(0o666)
        reply = json.loads(as_user("nobody", "-c", CLIENT, str(path)))
    finally:
        server.stop()
    assert reply == {"ok": True, "echo": "hello"}


def test_confine(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "pg_wal").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("x")
    (data / "pg_wal" / "000000010000000000000001").write_text("wal")
    assert control.confine(str(data / "pg_wal" / "000000010000000000000001"), data) == \
        (data / "pg_wal" / "000000010000000000000001").resolve()
    (data / "pg_wal" / "000000010000000000000002").symlink_to(outside / "secret")
    refusals = {
        str(outside / "secret"): "outside the data directory",
        f"{data}/pg_wal/../../outside/secret": "'..' is not allowed",
        str(data / "pg_wal" / "000000010000000000000002"): "resolves to",
        "pg_wal/000000010000000000000001": "needs an absolute path",
    }
    for path, why in refusals.items():
        with pytest.raises(ValueError, match=why):
            control.confine(path, data)
    # the data directory named through a symlink: PostgreSQL's working directory is the real one
    alias = tmp_path / "alias"
    alias.symlink_to(data)
    real = data / "pg_wal" / "000000010000000000000001"
    assert control.confine(str(real), alias) == real.resolve()
    assert control.confine(str(alias / "pg_wal" / "000000010000000000000001"), alias) == real.resolve()
    with pytest.raises(ValueError, match="resolves to"):
        control.confine(str(alias / "pg_wal" / "000000010000000000000002"), alias)
    # pg_wal on another disk (a top-level symlink of the data directory) is still the cluster's
    moved = tmp_path / "waldisk"
    moved.mkdir()
    (moved / "000000010000000000000003").write_text("wal")
    shutil.rmtree(data / "pg_wal")
    (data / "pg_wal").symlink_to(moved)
    assert control.confine(str(data / "pg_wal" / "000000010000000000000003"), data) == \
        moved / "000000010000000000000003"


def test_daemon_wal_push_accepts_only_files_of_the_data_directory(keys: Keys, tmp_path: Path,
                                                                   start_daemon) -> None:  # noqa: F811
    data_dir = tmp_path / "pgdata"
    (data_dir / "pg_wal" / "archive_status").mkdir(parents=True)
    state = tmp_path / "state"
    config = write_config(tmp_path / "c.toml", {
        "daemon": {"state_dir": str(state)},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient]},
        "jobs.pg": {"driver": "postgres", "dsn": "postgresql://postgres@127.0.0.1:1/x", "storage": "main",
                    "archive_logs": True, "data_dir": str(data_dir)},
    })
    secret = tmp_path / "000000010000000000000009"  # named like a segment, outside the cluster
    secret.write_text("the identity, /etc/shadow, ...")
    (data_dir / "pg_wal" / "00000001000000000000000A").symlink_to(secret)
    segment = data_dir / "pg_wal" / "000000010000000000000007"
    segment.write_bytes(os.urandom(8192))
    port = free_port()
    daemon = start_daemon(config, port, env={"BACKUPD_DAEMON__METRICS_LISTEN": f"127.0.0.1:{port}"})
    daemon.wait_ready()
    sock = control.socket_path(state)
    try:
        for path, why in [(str(secret), "outside the data directory"),
                          (f"{data_dir}/pg_wal/../../000000010000000000000009", "'..' is not allowed"),
                          (str(data_dir / "pg_wal" / "00000001000000000000000A"), "resolves to")]:
            reply = control.request(sock, {"op": "wal-push", "job": "pg", "path": path})
            assert reply is not None and reply["ok"] is False, reply
            assert reply["error"].startswith("wal-push refused: ") and why in reply["error"], reply
        ok = control.request(sock, {"op": "wal-push", "job": "pg", "path": str(segment)})
        assert ok is not None and ok["ok"] is True, ok
    finally:
        assert daemon.stop() == 0
    stored = {p.name for p in (tmp_path / "repo" / "pg" / "wal").rglob("*.zst.age")}
    assert stored == {"000000010000000000000007.zst.age"}
