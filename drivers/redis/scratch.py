"""A throwaway redis-server that loads one RDB, for verification.

It listens only on a unix socket, saves nothing, and runs as a replica of a
port that refuses connections (a socket bound but never listening, held for
the server's lifetime): a replica loads keys whose TTL has passed instead of
dropping them, so its key counts equal the snapshot's exactly, however long
after the backup the verification runs. Reads still hide expired keys.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

from backupd.children import stop_process
from backupd.errors import DriverError
from drivers.redis.resp import Connection, Endpoint, RedisReplyError

POLL = 0.05


class ScratchLoadFailed(Exception):
    """redis-server refused the RDB (corrupt, checksum mismatch, too new); carries its log."""


def server_version(binary: str) -> str:
    path = shutil.which(binary)
    if not path:
        raise DriverError(f"{binary}: not found on PATH", hint="install redis-server (Debian: redis-server)")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip()


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:])


@contextlib.contextmanager
def scratch_server(binary: str, directory: Path, dbfilename: str, databases: int = 16,
                   load_timeout: float = 600.0) -> Iterator[Endpoint]:
    """Start redis-server on ``directory/dbfilename``; yield its endpoint once the RDB is loaded."""
    path = shutil.which(binary)
    if not path:
        raise DriverError(f"{binary}: not found on PATH; verification needs redis-server",
                          hint="install redis-server (Debian: redis-server) or set redis_server in the job")
    sock_dir = Path(tempfile.mkdtemp(prefix="backupd-redis-"))  # short: unix socket paths max ~107 bytes
    sock_path = sock_dir / "redis.sock"
    log_path = directory / "redis-server.log"
    no_master = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    no_master.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
    argv = [path, "--port", "0", "--unixsocket", str(sock_path), "--unixsocketperm", "700",
            "--dir", str(directory), "--dbfilename", dbfilename, "--save", "", "--appendonly", "no",
            "--databases", str(max(16, databases)), "--replicaof", "127.0.0.1", str(no_master.getsockname()[1]),
            "--logfile", str(log_path), "--daemonize", "no"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = Endpoint(path=str(sock_path))
        _wait_loaded(proc, endpoint, log_path, load_timeout)
        yield endpoint
    finally:
        stop_process(proc)
        no_master.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def _wait_loaded(proc: subprocess.Popen, endpoint: Endpoint, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ScratchLoadFailed(f"redis-server exited with status {proc.returncode} loading the RDB: "
                                    f"{_log_tail(log_path)}")
        if Path(endpoint.path or "").exists():
            try:
                with Connection(endpoint, timeout=10, connect_timeout=2) as conn:
                    conn.command("PING")
                    return
            except RedisReplyError as exc:
                if not str(exc).startswith("LOADING"):
                    raise DriverError(f"scratch redis-server: {exc}") from None
            except DriverError:
                pass  # not accepting yet
        if time.monotonic() > deadline:
            raise DriverError(f"scratch redis-server did not finish loading within {timeout:.0f} s")
        time.sleep(POLL)
