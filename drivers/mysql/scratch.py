"""A throwaway mariadbd in a directory of its own: for verification and physical PITR.

It listens on a unix socket only (no TCP port to collide with), runs with
``--no-defaults`` so the host's my.cnf cannot leak in, and is always stopped:
``stop()`` shuts it down, then kills it if it does not exit in time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

import pymysql

from backupd.children import stop_process
from backupd.errors import DriverError
from drivers.mysql.client import Credentials, find_tool
from drivers.mysql.options import Endpoint

START_TIMEOUT = 120.0
STOP_TIMEOUT = 120.0
SOCKET_PATH_MAX = 100


def user_args() -> list[str]:
    """mariadbd refuses to run as root unless told to; elsewhere it runs as whoever we are."""
    return ["--user=root"] if os.geteuid() == 0 else []


def install_db(datadir: Path) -> None:
    datadir.mkdir(parents=True, exist_ok=True)
    argv = [find_tool("install_db"), "--no-defaults", f"--datadir={datadir}", *user_args(),
            "--auth-root-authentication-method=normal", "--skip-test-db"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no message"]
        raise DriverError(f"mariadb-install-db exited {proc.returncode}: {tail[0]}")


class ScratchServer:
    def __init__(self, datadir: Path, rundir: Path, extra: Sequence[str] = ()) -> None:
        self.datadir = datadir
        self.rundir = rundir
        self.extra = list(extra)
        self.socket = rundir / "mysqld.sock"
        self._socket_dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def credentials(self) -> Credentials:
        return Credentials(Endpoint(host="localhost", user="root", socket=str(self.socket)), None)

    @property
    def error_log(self) -> Path:
        return self.rundir / "mysqld.err"

    def start(self) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True)
        if len(str(self.socket)) > SOCKET_PATH_MAX:  # sun_path holds 108 bytes
            self._socket_dir = Path(tempfile.mkdtemp(prefix="backupd-my-"))
            self.socket = self._socket_dir / "mysqld.sock"
        argv = [find_tool("server"), "--no-defaults", *user_args(), f"--datadir={self.datadir}",
                f"--socket={self.socket}", "--skip-networking", f"--pid-file={self.rundir / 'mysqld.pid'}",
                f"--log-error={self.error_log}", "--innodb-buffer-pool-size=256M", "--max-allowed-packet=1G",
                *self.extra]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DriverError(f"scratch mariadbd exited {self.proc.returncode} at start: {self._log_tail()}")
            try:
                pymysql.connect(unix_socket=str(self.socket), user="root", connect_timeout=2).close()
                return
            except pymysql.MySQLError:
                time.sleep(0.05)
        self.stop()
        raise DriverError(f"scratch mariadbd did not accept connections within {START_TIMEOUT:.0f}s")

    def _log_tail(self) -> str:
        try:
            lines = [line for line in self.error_log.read_text(errors="replace").splitlines()
                     if "[ERROR]" in line and not line.rstrip().endswith("Aborting")]
            return (lines or ["see " + str(self.error_log)])[0]
        except OSError:
            return "no error log"

    def stop(self) -> None:
        try:
            self._stop()
        finally:
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, STOP_TIMEOUT)

    def __enter__(self) -> "ScratchServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
