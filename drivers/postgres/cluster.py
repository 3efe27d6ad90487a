"""A throwaway PostgreSQL cluster (initdb or a restored data directory), run as the postgres OS user.

Used by verification (scratch restores) and by the tests. Listens on a free
port and on a Unix socket inside its own directory; always stopped by
``close()``, on success and failure alike.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import psycopg

from backupd.errors import DriverError
from drivers.postgres.proc import run_tool

LOG_TAIL = 15


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_as(user: str | None) -> str | None:
    """The user to switch to with runuser, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    return user or "postgres"


def chown_tree(path: Path, user: str | None) -> None:
    """Give ``path`` (recursively) to ``user`` when we are root; a no-op otherwise."""
    target = run_as(user)
    if target is None:
        return
    try:
        entry = pwd.getpwnam(target)
    except KeyError:
        raise DriverError(f"OS user {target!r} does not exist (set the job's os_user)") from None
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def conf_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


class Cluster:
    def __init__(self, root: Path, bin_dir: Path, os_user: str | None = None, port: int | None = None) -> None:
        self.root = root
        self.bin_dir = bin_dir
        self.user = run_as(os_user)
        self.port = port or free_port()
        self.data = root / "data"
        self.socket_dir = root / "sock"
        self.logfile = root / "server.log"
        self._started = False

    def _tool(self, name: str) -> str:
        return str(self.bin_dir / name)

    def prepare_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        os.chmod(self.root, 0o700)
        chown_tree(self.root, self.user)

    def init(self, settings: dict[str, Any] | None = None, auth_host: str = "trust") -> None:
        self.prepare_root()
        run_tool([self._tool("initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                  f"--auth-host={auth_host}", "--no-instructions", "-E", "UTF8", "--locale=C"],
                 None, "initdb", user=self.user, timeout=120)
        self.configure(settings or {}, file="postgresql.conf")

    def configure(self, settings: dict[str, Any], file: str = "postgresql.auto.conf") -> None:
        base = {"port": self.port, "listen_addresses": "127.0.0.1", "unix_socket_directories": str(self.socket_dir),
                "timezone": "UTC", "log_timezone": "UTC", "fsync": True}
        lines = [f"{key} = {conf_value(value)}" for key, value in {**base, **settings}.items()]
        path = self.data / file
        with open(path, "a") as handle:
            handle.write("\n# throwaway cluster settings (backupd)\n" + "\n".join(lines) + "\n")
        chown_tree(path, self.user)

    def start(self, timeout: float = 120) -> None:
        self._started = True
        try:
            run_tool([self._tool("pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w",
                      "-t", str(int(timeout)), "start"], None, "pg_ctl start", user=self.user, timeout=timeout + 10)
        except DriverError as exc:
            raise DriverError(f"{exc}; server log: {self.log_tail()}") from None

    def stop(self, mode: str = "fast") -> None:
        if not self._started or not (self.data / "postmaster.pid").exists():
            self._started = False
            return
        with contextlib.suppress(DriverError):
            run_tool([self._tool("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"], None,
                     "pg_ctl stop", user=self.user, timeout=90)
        self._started = False

    def close(self) -> None:
        self.stop("immediate")

    def log_tail(self) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-LOG_TAIL:])

    def conninfo(self, dbname: str = "postgres", tcp: bool = False) -> str:
        host = "127.0.0.1" if tcp else str(self.socket_dir)
        return f"host='{host}' port={self.port} user=postgres dbname='{dbname}'"

    def url(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(self.conninfo(dbname), autocommit=True, **kwargs)

    def wait_promoted(self, timeout: float = 120) -> None:
        """Wait until recovery has ended and the server accepts writes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.connect() as conn:
                    if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                        return
            except psycopg.OperationalError:
                if not (self.data / "postmaster.pid").exists():
                    raise DriverError(f"the server stopped during recovery; server log: {self.log_tail()}") from None
            if time.monotonic() > deadline:
                raise DriverError(f"recovery did not finish within {timeout:.0f} s; server log: {self.log_tail()}")
            time.sleep(0.1)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def throwaway(root: Path, bin_dir: Path, os_user: str | None = None, **settings: Any) -> Iterator[Cluster]:
    cluster = Cluster(root, bin_dir, os_user)
    try:
        cluster.init(settings)
        cluster.start()
        yield cluster
    finally:
        cluster.close()
