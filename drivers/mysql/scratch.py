"""A throwaway mariadbd in a sandbox of its own: verification, the PITR drill, physical PITR restore.

What it runs is content from the repository (a dump, binlogs, a physical copy),
so the server is locked down twice. Inside: ``--no-defaults`` (the host's
my.cnf cannot leak in), ``--skip-networking`` (a unix socket in its run
directory is the only way in), ``--secure-file-priv`` set to an empty
directory of the scratch (``INTO OUTFILE``, ``LOAD_FILE`` and ``LOAD DATA``
reach nothing else), ``--local-infile=0``. Outside: ``backupd.scratch``
runs it in the bubblewrap sandbox as the unprivileged scratch user (never
root, no ``--user=root``), seeing only its own directories, so a statement
that gets past the server's settings (``SET GLOBAL general_log_file``, a
plugin) still reads and writes nothing of the host.

The clients that load a dump or replay binlogs into it run outside the sandbox
and connect over the socket (see ``drivers.mysql.load.client_argv`` for how
they are kept from acting on the host).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import pymysql

from backupd.errors import DriverError
from backupd.sandbox import Sandbox, chown_to
from backupd.scratch import ScratchServer
from backupd.tool import run
from drivers.mysql.client import Credentials, tool_path
from drivers.mysql.options import Endpoint

START_TIMEOUT = 120.0
STOP_TIMEOUT = 120.0
INSTALL_TIMEOUT = 300.0
#: sun_path holds 108 bytes; a longer socket path moves the socket to a short directory of its own.
SOCKET_PATH_MAX = 100

#: Builds the sandbox for the directories a scratch server may write (``Driver.scratch_sandbox``).
SandboxFor = Callable[[list[Path]], Sandbox]


def install_db(datadir: Path, sandbox_for: SandboxFor) -> None:
    """A fresh system schema in ``datadir``, made by mariadb-install-db in the sandbox as the scratch user."""
    datadir.mkdir(parents=True, exist_ok=True, mode=0o700)
    sandbox = sandbox_for([datadir])
    give_to(sandbox.user, [datadir])
    run([tool_path("install_db"), "--no-defaults", f"--datadir={datadir}", "--auth-root-authentication-method=normal",
         "--skip-test-db", "--skip-name-resolve"], sandbox=sandbox, timeout=INSTALL_TIMEOUT,
        what="creating the scratch server's system tables")


class MariadbScratch:
    """mariadbd on ``datadir``; its socket, logs, temporary files and file directory live in ``rundir``."""

    def __init__(self, datadir: Path, rundir: Path, sandbox_for: SandboxFor, extra: Sequence[str] = ()) -> None:
        self.datadir = datadir
        self.rundir = rundir
        self.sandbox_for = sandbox_for
        self.extra = list(extra)
        self.socket = rundir / "mysqld.sock"
        self.files = rundir / "files"  #: --secure-file-priv: empty, the only place statements may touch files
        self._socket_dir: Path | None = None
        self.server: ScratchServer | None = None

    @property
    def credentials(self) -> Credentials:
        return Credentials(Endpoint(host="localhost", user="root", socket=str(self.socket)), None)

    @property
    def error_log(self) -> Path:
        return self.rundir / "mysqld.err"

    @property
    def pid(self) -> int | None:
        """The mariadbd process (below the sandbox's wrappers), while it runs."""
        if self.server is None or self.server.tool is None:
            return None
        return ScratchServer.server_pid(self.server.tool.pid)

    def _directories(self) -> list[Path]:
        """The run directories, created; with the datadir, everything the server may write."""
        tmp = self.rundir / "tmp"
        for path in (self.rundir, self.files, tmp):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        writable = [self.datadir, self.rundir]
        if len(str(self.socket)) > SOCKET_PATH_MAX:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="backupd-my-"))
            self.socket = self._socket_dir / "mysqld.sock"
            writable.append(self._socket_dir)
        return writable

    def argv(self) -> list[str]:
        return [tool_path("server"), "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.socket}",
                "--skip-networking", f"--secure-file-priv={self.files}", "--local-infile=0",
                f"--tmpdir={self.rundir / 'tmp'}", f"--pid-file={self.rundir / 'mysqld.pid'}",
                f"--log-error={self.error_log}", "--innodb-buffer-pool-size=256M", "--max-allowed-packet=1G",
                *self.extra]

    def start(self) -> None:
        """Start in the sandbox and wait for the socket; ScratchFailed (with the log's errors) if it exits."""
        writable = self._directories()
        sandbox = self.sandbox_for(writable)
        give_to(sandbox.user, writable)
        self.server = ScratchServer("mariadbd", self.argv(), sandbox, ready=self._ready, log=self.error_log,
                                    stop_signal=signal.SIGTERM, log_filter=_errors)
        try:
            self.server.start(START_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        try:
            pymysql.connect(unix_socket=str(self.socket), user="root", connect_timeout=2).close()
            return True
        except pymysql.MySQLError:
            return False

    def stop(self) -> None:
        server, self.server = self.server, None
        try:
            if server is not None:
                server.stop(STOP_TIMEOUT)
        finally:
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
                self._socket_dir = None

    def __enter__(self) -> "MariadbScratch":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def give_to(user: str | None, directories: list[Path]) -> None:
    """Hand ``directories`` to the scratch user (when backupd is root), who must also reach them."""
    for path in directories:
        require_reachable(path, user)
        chown_to(path, user)


def require_reachable(path: Path, user: str | None) -> None:
    """DriverError naming the closed parent unless ``user`` (the scratch user when backupd is root) reaches ``path``."""
    if user is None or os.geteuid() != 0:
        return
    blocked = closed_to(path, user)
    if blocked is not None:
        raise DriverError(f"{path}: the scratch server runs as OS user {user}, who cannot pass through {blocked}",
                          hint=f"use a directory whose parents {user} may traverse (chmod o+x {blocked})")


def closed_to(path: Path, user: str) -> Path | None:
    """The first directory above ``path`` that ``user`` may not pass through (mode bits; ACLs are not read)."""
    entry = pwd.getpwnam(user)
    groups = {entry.pw_gid} | {group.gr_gid for group in grp.getgrall() if user in group.gr_mem}
    for directory in reversed(path.absolute().parents):
        try:
            info = directory.stat()
        except FileNotFoundError:  # made later, by root: checked again once it exists
            return None
        if info.st_uid == entry.pw_uid:
            bit = stat.S_IXUSR
        elif info.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return directory
    return None


def _errors(lines: list[str]) -> list[str]:
    return [line for line in lines if "[ERROR]" in line and not line.rstrip().endswith("Aborting")]


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

