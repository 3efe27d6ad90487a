"""Throwaway mariadbd instances for the mysql driver tests (temp dirs, free ports, always stopped)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pymysql
import zstandard

from support import require_tool

PASSWORD = "S3cret-pw-9f1c"  # the backup user's; tests assert it never shows up in argv or output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Mariadb:
    """One mariadbd on 127.0.0.1:<free port>, data in a /tmp dir of its own, run as root."""

    def __init__(self, log_bin: bool = True, server_id: int = 1) -> None:
        require_tool("mariadbd")
        require_tool("mariadb-install-db")
        self.base = Path(tempfile.mkdtemp(prefix="backupd-mysql-test-", dir="/tmp"))
        self.datadir = self.base / "data"
        self.port = free_port()
        self.log_bin = log_bin
        self.server_id = server_id
        self.proc: subprocess.Popen[bytes] | None = None
        # a tmpdir of its own: bootstraps running at once in the shared /tmp have removed each other's temp tables
        (self.base / "tmp").mkdir()
        self.env = {**os.environ, "TMPDIR": str(self.base / "tmp")}
        made = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}", "--user=root",
                               "--auth-root-authentication-method=normal", "--skip-test-db"],
                              capture_output=True, text=True, timeout=120, env=self.env)
        if made.returncode != 0:
            shutil.rmtree(self.base, ignore_errors=True)
            raise AssertionError(f"mariadb-install-db exited {made.returncode}: {(made.stdout + made.stderr)[-3000:]}")

    def start(self) -> None:
        argv = [require_tool("mariadbd"), "--no-defaults", "--user=root",
                f"--datadir={self.datadir}", f"--socket={self.base / 'sock'}", f"--port={self.port}",
                "--bind-address=127.0.0.1", f"--pid-file={self.base / 'pid'}", f"--log-error={self.base / 'err.log'}",
                f"--server-id={self.server_id}", "--innodb-buffer-pool-size=128M", "--skip-name-resolve", f"--tmpdir={self.base / 'tmp'}"]
        if self.log_bin:
            argv += [f"--log-bin={self.datadir / 'mysql-bin'}", "--binlog-format=ROW"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)
        wait_for(self._ready, 60, f"mariadbd on port {self.port}")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"mariadbd exited {self.proc.returncode}: {(self.base / 'err.log').read_text()[-2000:]}")
        try:
            self.connect().close()
            return True
        except pymysql.MySQLError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def connect(self, database: str | None = None, user: str = "root", password: str = "") -> pymysql.Connection:
        return pymysql.connect(host="127.0.0.1", port=self.port, user=user, password=password, database=database,
                               autocommit=True, connect_timeout=5)

    def sql(self, *statements: str, database: str | None = None) -> list[tuple[Any, ...]]:
        conn = self.connect(database)
        try:
            rows: list[tuple[Any, ...]] = []
            with conn.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
                    rows = list(cursor.fetchall())
            return rows
        finally:
            conn.close()

    def create_backup_user(self) -> None:
        self.sql("CREATE USER IF NOT EXISTS 'backup'@'%' IDENTIFIED BY '" + PASSWORD + "'",
                 "GRANT ALL PRIVILEGES ON *.* TO 'backup'@'%' WITH GRANT OPTION")

    def url(self, user: str = "backup") -> str:
        return f"mysql://{user}@127.0.0.1:{self.port}/"

    def master_status(self) -> tuple[str, int]:
        file, pos = self.sql("SHOW MASTER STATUS")[0][:2]
        return str(file), int(pos)

    def count(self, table: str) -> int:
        return int(self.sql(f"SELECT COUNT(*) FROM {table}")[0][0])


def started(log_bin: bool = True, server_id: int = 1) -> Mariadb:
    server = Mariadb(log_bin, server_id)
    try:
        server.start()
        server.create_backup_user()
    except BaseException:
        server.destroy()
        raise
    return server


def cmdlines() -> dict[int, bytes]:
    """Every process's argv and environment, as raw bytes, keyed by pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                data = handle.read()
            with open(f"/proc/{entry}/environ", "rb") as handle:
                data += b"\n" + handle.read()
        except OSError:
            continue
        found[int(entry)] = data
    return found


def stored_stream(repo: Path, job: str, backup_id: str, name: str, identity: Any) -> bytes:
    """A backup's stream as the driver wrote it: decrypted and decompressed."""
    from backupd import age

    manifest = json.loads((repo / job / "backups" / backup_id / "manifest.json").read_text())
    entry = next(obj for obj in manifest["objects"] if obj["name"] == name)
    data = age.decrypt([identity], (repo / job / "backups" / backup_id / entry["key"]).read_bytes())
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def forge_stream(repo: Path, job: str, backup_id: str, name: str, data: bytes, recipient: Any) -> None:
    """Replace a backup's stream with ``data``, as a writer to the repository holding the public key could.

    The object is encrypted to the job's recipient and the manifest's size and sha256 updated,
    so the integrity check passes and only the content is hostile.
    """
    from backupd import age

    path = repo / job / "backups" / backup_id / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = next(obj for obj in manifest["objects"] if obj["name"] == name)
    stored = age.encrypt([recipient], zstandard.ZstdCompressor().compress(data))
    (repo / job / "backups" / backup_id / entry["key"]).write_bytes(stored)
    entry.update(raw_size=len(data), stored_size=len(stored), sha256=hashlib.sha256(stored).hexdigest())
    path.write_text(json.dumps(manifest))


@contextlib.contextmanager
def open_dir() -> Iterator[Path]:
    """A directory the scratch server's OS user may pass through (pytest's tmp_path is below a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="backupd-mysql-open-", dir="/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def scratch_server(datadir: Path, rundir: Path) -> Iterator[Any]:
    """The driver's sandboxed scratch mariadbd on a restored data directory (grant tables skipped).

    Both directories must lie where the scratch user can reach them (``open_dir``).
    """
    from backupd.sandbox import SandboxPolicy, unprivileged_user
    from drivers.mysql.scratch import MariadbScratch

    user = unprivileged_user(None, ("mysql",))
    with MariadbScratch(datadir, rundir, lambda dirs: SandboxPolicy().for_scratch(dirs, user=user),
                        ["--skip-grant-tables"]) as server:
        yield server


@contextlib.contextmanager
def writing(source: Mariadb, table: str) -> Iterator[None]:
    """A client inserting into ``table`` every few milliseconds for as long as the block runs."""
    stop = threading.Event()

    def writer() -> None:
        conn = source.connect()
        try:
            with conn.cursor() as cur:
                while not stop.is_set():
                    cur.execute(f"INSERT INTO {table} (v) VALUES (1)")
                    time.sleep(0.005)
        finally:
            conn.close()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
