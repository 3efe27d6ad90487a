"""Throwaway redis-server instances for the Redis driver tests (free port, temp dir, always stopped)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.redis.resp import Connection, Endpoint

PASSWORD = "s3cret-Redis-pw-7c1e"
USER = "backup"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RedisServer:
    port: int
    directory: Path
    proc: subprocess.Popen
    admin: Endpoint  # the default user, with the password

    def conn(self) -> Connection:
        conn = Connection(self.admin, timeout=30)
        conn.authenticate()
        return conn

    def command(self, *args: Any, db: int = 0) -> Any:
        with self.conn() as conn:
            if db:
                conn.command("SELECT", db)
            return conn.command(*args)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_redis(binary: str, directory: Path, *, dbfilename: str = "dump.rdb", acl_user: bool = True,
                extra: list[str] | None = None) -> RedisServer:
    """redis-server --save "" --appendonly no on a free port; passwords only in a 0600 config file."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = directory / "redis.conf"
    lines = ["bind 127.0.0.1", f"port {port}", f'dir "{directory}"', f"dbfilename {dbfilename}", 'save ""',
             "appendonly no", "enable-debug-command yes", f"requirepass {PASSWORD}",
             f'logfile "{directory / "redis.log"}"']
    if acl_user:  # the least a backup user needs: connection, INFO, the replication handshake
        lines.append(f"user {USER} on >{PASSWORD} -@all +ping +info +replconf +psync +auth +select")
    conf.write_text("\n".join(lines + (extra or [])) + "\n")
    conf.chmod(0o600)
    proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port, directory, proc, Endpoint(host="127.0.0.1", port=port, password=PASSWORD))
    deadline = time.monotonic() + 10
    while True:
        try:
            server.command("PING")
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"redis-server did not start: {(directory / 'redis.log').read_text()[-500:]}")
            time.sleep(0.05)
    server.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")  # tests only; backupd never changes it
    return server


def populate(server: RedisServer, big: bytes, ttl_ms: int = 3_600_000) -> dict[str, int]:
    """Keys of every type in db 0, a few in db 3, a large value, a TTL; returns the keys per db."""
    with server.conn() as conn:
        conn.command("SET", "greeting", "hello")
        conn.command("SET", "counter", 42)
        conn.command("SET", "big", big)
        conn.command("RPUSH", "queue", *[f"job-{i}" for i in range(300)])  # long enough for a real quicklist
        conn.command("RPUSH", "short", "a", "b")
        conn.command("SADD", "tags", "red", "green", "blue")
        conn.command("SADD", "ints", 1, 2, 3, 99)  # intset encoding
        conn.command("SADD", "bigset", *[f"member-{i}" for i in range(600)])  # hashtable encoding
        conn.command("ZADD", "scores", 1.5, "alice", 2, "bob", "inf", "max")
        conn.command("ZADD", "bigzset", *[x for i in range(300) for x in (i / 3, f"m{i}")])  # skiplist encoding
        conn.command("HSET", "user:1", "name", "Ada", "lang", "en")
        conn.command("HSET", "bighash", *[x for i in range(600) for x in (f"f{i}", f"v{i}" * 10)])
        for i in range(5):
            conn.command("XADD", "events", "*", "n", i)
        conn.command("XGROUP", "CREATE", "events", "workers", "0")
        conn.command("XREADGROUP", "GROUP", "workers", "w1", "COUNT", 2, "STREAMS", "events", ">")
        conn.command("SET", "session", "short-lived", "PX", ttl_ms)
        conn.command("EVAL", "for i=1,2000 do redis.call('SET', 'k:'..i, i) end return 1", 0)
        conn.command("SELECT", 3)
        conn.command("SET", "other-db", "x")
        conn.command("HSET", "h3", "a", "1")
    return keyspace(server)


def keyspace(server: RedisServer) -> dict[str, int]:
    with server.conn() as conn:
        info = conn.info("keyspace")
    return {db: int(value.split(",")[0].split("=")[1]) for db, value in info.items()}


def cmdlines() -> list[str]:
    """Every process's argv, as ps would show it."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return found


def real_rdb(directory: Path) -> bytes:
    """A real RDB with every type (and an LZF-compressed value), from a real redis-server in ``directory``."""
    from drivers.redis.transfer import RdbTransfer
    from support import require_tool

    server = start_redis(require_tool("redis-server"), directory)
    try:
        populate(server, b"L" * 100_000, ttl_ms=3_600_000)
        conn = Connection(server.admin)
        conn.authenticate()
        transfer = RdbTransfer.start(conn)
        data = b"".join(iter(lambda: transfer.read(1 << 20), b""))
        conn.close()
        return data
    finally:
        server.stop()
