"""The replication transfer and the RDB parser against a scripted fake master and crafted bytes.

The real server cannot be made to split its end mark across receives, hang up
half way through a snapshot or send a malformed RDB on demand; a fake master
that speaks just enough RESP can, with a real RDB taken from a real server.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from backupd.errors import DriverError
from core_fixtures import Keys
from drivers.redis.rdb import RdbFormatError, RdbUnsupported, parse_stream
from drivers.redis.resp import Connection, parse_dsn
from drivers.redis.transfer import RdbTransfer, StreamingParser, TeeReader
from redis_support import RedisServer, populate, real_rdb, start_redis
from support import BACKUPD, REPO_ROOT, require_tool, run_backupd, write_config

MARK = b"0123456789abcdef0123456789abcdef01234567"

Script = Callable[[socket.socket], None]


class FakeMaster:
    """Answers AUTH/PING/INFO/REPLCONF; on PSYNC runs ``script`` on the socket."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.commands: list[list[bytes]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(sock,), daemon=True).start()

    def _client(self, sock: socket.socket) -> None:
        reader = sock.makefile("rb")
        try:
            while True:
                header = reader.readline()
                if not header:
                    return
                argv = []
                for _ in range(int(header[1:])):
                    size = int(reader.readline()[1:])
                    argv.append(reader.read(size + 2)[:-2])
                self.commands.append(argv)
                name = argv[0].upper()
                if name == b"PSYNC":
                    self.script(sock)
                    return
                if name == b"INFO":
                    body = b"# Server\r\nredis_version:7.9.9\r\nredis_mode:standalone\r\n"
                    sock.sendall(b"$%d\r\n%s\r\n" % (len(body), body))
                elif name == b"PING":
                    sock.sendall(b"+PONG\r\n")
                else:
                    sock.sendall(b"+OK\r\n")
        except OSError:
            pass
        finally:
            sock.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def rdb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real RDB with every type, from a real redis-server."""
    return real_rdb(tmp_path_factory.mktemp("rdb-source"))


@pytest.fixture
def fake() -> Iterator[Callable[[Script], FakeMaster]]:
    masters: list[FakeMaster] = []

    def make(script: Script) -> FakeMaster:
        masters.append(FakeMaster(script))
        return masters[-1]

    yield make
    for master in masters:
        master.close()


def trickle(sock: socket.socket, data: bytes, size: int) -> None:
    for start in range(0, len(data), size):
        sock.sendall(data[start:start + size])
        time.sleep(0.0005)


def fetch(port: int) -> tuple[bytes, RdbTransfer]:
    conn = Connection(parse_dsn(f"redis://127.0.0.1:{port}"), timeout=5)
    try:
        conn.authenticate()
        transfer = RdbTransfer.start(conn)
        parser = StreamingParser()
        tee = TeeReader(transfer, parser)
        data = b"".join(iter(lambda: tee.read(1 << 16), b""))
        parser.finish()
        return data, transfer
    finally:
        conn.close()


def test_diskless_mark_split_across_receives(rdb: bytes, fake: Callable[[Script], FakeMaster]) -> None:
    def script(sock: socket.socket) -> None:
        sock.sendall(b"+FULLRESYNC " + b"f" * 40 + b" 1234\r\n\n\n")  # keepalives while the server forks
        # 7-byte pieces: the 40-byte mark arrives in several receives; replication traffic follows it
        trickle(sock, b"$EOF:" + MARK + b"\r\n" + rdb + MARK + b"*1\r\n$4\r\nPING\r\n", 4096 + 7)
        time.sleep(0.2)

    master = fake(script)
    data, transfer = fetch(master.port)
    assert data == rdb
    assert transfer.info.form == "diskless" and transfer.info.offset == 1234 and transfer.received == len(rdb)
    assert [c[0] for c in master.commands] == [b"PING", b"REPLCONF", b"REPLCONF", b"PSYNC"]
    assert master.commands[-1] == [b"PSYNC", b"?", b"-1"]


def test_sized_payload_ignores_what_follows(rdb: bytes, fake: Callable[[Script], FakeMaster]) -> None:
    master = fake(lambda sock: sock.sendall(b"+FULLRESYNC x 0\r\n$%d\r\n" % len(rdb) + rdb + b"+PING\r\n"))
    data, transfer = fetch(master.port)
    assert data == rdb and transfer.info.form == "disk" and transfer.info.announced_size == len(rdb)


def test_hang_up_mid_transfer_is_an_error(rdb: bytes, fake: Callable[[Script], FakeMaster]) -> None:
    half = len(rdb) // 2
    sized = fake(lambda sock: sock.sendall(b"+FULLRESYNC x 0\r\n$%d\r\n" % len(rdb) + rdb[:half]))
    with pytest.raises(DriverError, match=rf"closed the connection after {half} of {len(rdb)} RDB bytes"):
        fetch(sized.port)
    marked = fake(lambda sock: sock.sendall(b"+FULLRESYNC x 0\r\n$EOF:" + MARK + b"\r\n" + rdb[:half]))
    with pytest.raises(DriverError, match="before the end mark"):
        fetch(marked.port)


def test_psync_refused_names_the_permission(fake: Callable[[Script], FakeMaster]) -> None:
    master = fake(lambda sock: sock.sendall(b"-NOPERM this user has no permissions to run the 'psync' command\r\n"))
    with pytest.raises(DriverError, match="PSYNC refused: NOPERM") as err:
        fetch(master.port)
    assert "+psync" in (err.value.hint or "")


def chunks(data: bytes, size: int = 5) -> Callable[[], bytes]:
    pieces = iter([data[i:i + size] for i in range(0, len(data), size)])
    return lambda: next(pieces, b"")


def test_parser_counts_and_validates(rdb: bytes) -> None:
    summary = parse_stream(chunks(rdb, 3))  # tiny chunks: every read straddles a boundary
    assert summary.key_counts()["db3"] == 2 and summary.key_counts()["db0"] > 2000
    assert summary.size == len(rdb) and len(summary.checksum) == 16
    assert summary.aux["redis-ver"].startswith("7")
    with pytest.raises(RdbFormatError, match="truncated"):
        parse_stream(chunks(rdb[:-20]))
    with pytest.raises(RdbFormatError, match="followed by unexpected data"):
        parse_stream(chunks(rdb + b"junk"))
    with pytest.raises(RdbFormatError, match="not an RDB stream"):
        parse_stream(chunks(b"<html>hello</html>"))
    with pytest.raises(RdbUnsupported, match="RDB version 99"):
        parse_stream(chunks(b"REDIS0099" + rdb[9:]))
    with pytest.raises(RdbFormatError, match="truncated"):
        parse_stream(chunks(b""))


def fake_job(tmp_path: Path, keys: Keys, port: int) -> Path:
    return write_config(tmp_path / "fake.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.cache": {"driver": "redis", "dsn": f"redis://127.0.0.1:{port}", "storage": "main", "timeout": 5},
    })


def test_malformed_or_cut_snapshot_leaves_no_backup(rdb: bytes, fake: Callable[[Script], FakeMaster],
                                                    keys: Keys, tmp_path: Path) -> None:
    cut = rdb[:-200]  # announced as complete, but the RDB inside ends early
    master = fake(lambda sock: sock.sendall(b"+FULLRESYNC x 0\r\n$%d\r\n" % len(cut) + cut))
    config = fake_job(tmp_path, keys, master.port)
    result = run_backupd("backup", "cache", config=config)
    assert result.code == 1
    assert "the RDB snapshot is malformed: RDB truncated" in result.err
    assert json.loads(run_backupd("list", "--json", config=config).out)["backups"] == []
    assert not list((tmp_path / "repo").glob("cache/backups/*/manifest.json"))


def test_killed_mid_transfer_then_next_run_succeeds(rdb: bytes, fake: Callable[[Script], FakeMaster],
                                                    keys: Keys, tmp_path: Path, redis_bin_server: RedisServer) -> None:
    def stall(sock: socket.socket) -> None:
        sock.sendall(b"+FULLRESYNC x 0\r\n$%d\r\n" % len(rdb) + rdb[: len(rdb) // 2])
        time.sleep(30)

    master = fake(stall)
    config = fake_job(tmp_path, keys, master.port)
    proc = subprocess.Popen([*BACKUPD, "--config", str(config), "--log-format", "json", "backup", "cache"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not list((tmp_path / "repo").glob("cache/backups/*")) and time.monotonic() < deadline:
        time.sleep(0.05)  # the backup's first object is being written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    password_file = tmp_path / "pw"
    password_file.write_text(redis_bin_server.admin.password or "")
    real = write_config(tmp_path / "real.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.cache": {"driver": "redis", "dsn": f"redis://127.0.0.1:{redis_bin_server.port}",
                       "password_file": str(password_file), "storage": "main"},
    })
    backup_id = run_backupd("backup", "cache", config=real, check=True).out.strip()
    listed = json.loads(run_backupd("list", "--json", config=real).out)["backups"]
    assert [b["backup_id"] for b in listed] == [backup_id]
    assert run_backupd("verify", "cache", config=real).code == 0


@pytest.fixture
def redis_bin_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(require_tool("redis-server"), tmp_path / "real")
    try:
        populate(server, b"v")
        yield server
    finally:
        server.stop()
