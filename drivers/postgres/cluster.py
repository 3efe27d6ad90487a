"""A PostgreSQL server backupd runs itself: ``initdb`` or a restored data directory, ``postgres -D`` in the foreground.

Verification and the PITR drill run it as a ``ScratchServer`` inside the job's
sandbox (listening on a Unix socket in its own directory only); the tests'
throwaway "production" clusters run through the same class with a disabled
sandbox (they need TCP and an archive_command that reaches backupd). Stopped by
``close()`` on success and failure alike.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, Sequence

import psycopg

from backupd import tool
from backupd.errors import DriverError
from backupd.sandbox import Sandbox, chown_to
from backupd.scratch import ScratchFailed, ScratchServer

LOG_TAIL = 15
LOG_KEEP = 256 << 10  #: bytes of the server's stderr (its log) kept for messages and log checks
STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_as(user: str | None) -> str | None:
    """The OS user a restored data directory is given to: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    return user or "postgres"


def chown_tree(path: Path, user: str | None) -> None:
    """Give ``path`` (recursively) to ``user`` when we are root; a no-op otherwise."""
    target = run_as(user)
    if target is None:
        return
    try:
        chown_to(path, target)
    except KeyError:
        raise DriverError(f"OS user {target!r} does not exist (set the job's os_user)") from None


def unsandboxed(root: Path, user: str | None = "postgres") -> Sandbox:
    """No bubblewrap, as ``user`` when we are root: for servers that must reach the host (tests' primaries)."""
    return Sandbox((root,), run_as(user), enabled=False)


def conf_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def conf_lines(settings: dict[str, Any]) -> str:
    return "".join(f"{key} = {conf_value(value)}\n" for key, value in settings.items())


class Cluster:
    """One PostgreSQL server under ``root`` (data/, sock/), run in ``sandbox``.

    ``options`` are extra ``postgres`` command-line arguments (``-c config_file=...``).
    """

    def __init__(self, root: Path, bin_dir: Path, sandbox: Sandbox, port: int | None = None,
                 options: Sequence[str] = ()) -> None:
        self.root = root
        self.bin_dir = bin_dir
        self.sandbox = sandbox
        self.user = sandbox.user
        self.port = port or free_port()
        self.data = root / "data"
        self.socket_dir = root / "sock"
        self.options = list(options)
        self.server: ScratchServer | None = None
        self._log = ""
        self._status: int | None = None

    def _tool(self, name: str) -> str:
        return str(self.bin_dir / name)

    def prepare_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        os.chmod(self.root, 0o700)
        chown_to(self.root, self.user)

    def init(self, settings: dict[str, Any] | None = None, auth_host: str = "trust") -> None:
        self.prepare_root()
        tool.run([self._tool("initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                  f"--auth-host={auth_host}", "--no-instructions", "-E", "UTF8", "--locale=C"],
                 sandbox=self.sandbox, timeout=120, name="initdb")
        self.configure(settings or {}, file="postgresql.conf")

    def base_settings(self) -> dict[str, Any]:
        return {"port": self.port, "listen_addresses": "127.0.0.1", "unix_socket_directories": str(self.socket_dir),
                "timezone": "UTC", "log_timezone": "UTC", "fsync": True}

    def configure(self, settings: dict[str, Any], file: str = "postgresql.auto.conf") -> None:
        path = self.data / file
        with open(path, "a") as handle:
            handle.write("\n# throwaway cluster settings (backupd)\n" + conf_lines({**self.base_settings(), **settings}))
        chown_to(path, self.user)

    def start(self, timeout: float = 120) -> None:
        """Start ``postgres`` in the foreground; back once it accepts connections (or is a hot standby)."""
        self._log = ""
        argv = [self._tool("postgres"), "-D", str(self.data), *self.options]
        self.server = ScratchServer("postgres", argv, self.sandbox, ready=self._ready,
                                    stop_signal=STOP_SIGNALS["fast"])
        try:
            self.server.start(timeout)
        except ScratchFailed as exc:
            self.stop("immediate")
            raise DriverError(f"{exc}; server log: {self.log_tail()}") from None

    def _ready(self) -> bool:
        """What ``pg_ctl -w`` waits for: postmaster.pid says ready (or standby, accepting read-only queries)."""
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() in ("ready", "standby")

    def stop(self, mode: str = "fast") -> None:
        server, self.server = self.server, None
        if server is None:
            return
        if server.tool is not None:
            self._log = server.tool.stderr_text(LOG_KEEP)
        self._status = server.exited()
        server.stop_signal = STOP_SIGNALS[mode]
        server.stop()

    def killed(self) -> bool:
        """The server (or its sandbox) ended by a signal: killed by us (a cancelled run), not failed on its data.

        PostgreSQL itself exits with a status when recovery or start fails; the wrappers pass that on.
        """
        status = self.server.exited() if self.server is not None else self._status
        return status is not None and status < 0

    def close(self) -> None:
        self.stop("immediate")

    def log_text(self) -> str:
        """The server's log (its stderr), the last LOG_KEEP bytes; kept after it stopped."""
        if self.server is not None and self.server.tool is not None:
            return self.server.tool.stderr_text(LOG_KEEP)
        return self._log

    def log_tail(self) -> str:
        lines = [line.strip() for line in self.log_text().splitlines() if line.strip()]
        return " | ".join(lines[-LOG_TAIL:]) or "(empty log)"

    def conninfo(self, dbname: str = "postgres", tcp: bool = False, user: str = "postgres") -> str:
        host = "127.0.0.1" if tcp else str(self.socket_dir)
        return f"host='{host}' port={self.port} user='{user}' dbname='{dbname}'"

    def url(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", user: str = "postgres", **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(self.conninfo(dbname, user=user), autocommit=True, **kwargs)

    def wait_promoted(self, timeout: float = 120) -> None:
        """Wait until recovery has ended and the server accepts writes."""
        deadline = time.monotonic() + timeout
        while True:
            if self.server is None or self.server.exited() is not None:
                raise DriverError(f"the server stopped during recovery; server log: {self.log_tail()}")
            with contextlib.suppress(psycopg.OperationalError):
                with self.connect() as conn:
                    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                    if row is not None and not row[0]:
                        return
            if time.monotonic() > deadline:
                raise DriverError(f"recovery did not finish within {timeout:.0f} s; server log: {self.log_tail()}")
            time.sleep(0.1)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

