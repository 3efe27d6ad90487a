"""A throwaway redis-server that loads one RDB, for verification, in the bubblewrap sandbox.

The RDB comes from the repository, so it is treated as hostile: the server
runs as an unprivileged user in ``backupd.sandbox`` (its scratch directory the
only thing it can write, no view of the identity or the configuration, no
network), listens only on a unix socket (``port 0``), saves nothing, and has
the MODULE and DEBUG commands off.

It runs as a replica of 127.0.0.1:1, where nothing listens inside the
sandbox's private network namespace (and only root could listen outside it):
a replica loads keys whose TTL has passed instead of dropping them, so its key
counts equal the snapshot's exactly, however long after the backup the
verification runs. Reads still hide expired keys.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from backupd.errors import DriverError, IntegrityError
from backupd.sandbox import chown_to
from backupd.scratch import ScratchFailed, ScratchServer
from backupd.tool import find_tool, tool_version
from drivers.redis.rdb import MAX_DATABASE
from drivers.redis.resp import Connection, Endpoint, RedisReplyError

if TYPE_CHECKING:
    from drivers.redis.driver import RedisDriver

HINT = "install redis-server (Debian: redis-server) or set redis_server in the job"
#: What redis-server logs when it refuses an RDB's content (rdb.c, redis-check-rdb), as opposed to "could not run".
REFUSALS = ("RDB ERROR DETECTED", "Internal error in RDB", "Short read", "Wrong signature", "Can't handle RDB",
            "Wrong RDB checksum", "configured to handle more than", "module data I can't load",
            "Unrecoverable error")
NO_MASTER = ("127.0.0.1", "1")


def server_path(binary: str) -> str:
    return find_tool(binary, hint=HINT)


def server_version(binary: str) -> str:
    return tool_version(server_path(binary), _parse_version)


def _parse_version(text: str) -> str:
    for word in text.split():
        if word.startswith("v="):
            return word[2:]
    return text.strip()


def _log_lines(lines: list[str]) -> list[str]:
    """The lines of redis-server's log that say what went wrong (not its banner or memory warnings)."""
    return [line for line in lines if "WARNING Memory overcommit" not in line
            and any(word in line for word in ("RDB", "rdb", "Fatal", "FATAL", "rror", "Exiting", "refus"))]


@contextlib.contextmanager
def scratch_server(driver: "RedisDriver", directory: Path, dbfilename: str, databases: int = 16,
                   load_timeout: float = 600.0) -> Iterator[tuple[Endpoint, ScratchServer]]:
    """redis-server on ``directory/dbfilename`` in the sandbox; yields its endpoint once the RDB is loaded.

    IntegrityError when redis-server refuses the RDB; DriverError (SandboxUnavailable)
    when it cannot run at all.
    """
    path = server_path(driver.options.redis_server)
    # A short directory of its own for the socket: unix socket paths are limited to ~107 bytes.
    sock_dir = Path(tempfile.mkdtemp(prefix="backupd-redis-"))
    try:
        user = driver.scratch_user()
        for owned in (directory, sock_dir):
            chown_to(owned, user)
        sandbox = driver.scratch_sandbox([directory, sock_dir])
        endpoint = Endpoint(path=str(sock_dir / "redis.sock"))
        log = directory / "redis-server.log"
        argv = [path, "--port", "0", "--unixsocket", str(endpoint.path), "--unixsocketperm", "700",
                "--dir", str(directory), "--dbfilename", dbfilename, "--save", "", "--appendonly", "no",
                "--databases", str(min(max(16, databases), MAX_DATABASE + 1)),
                "--replicaof", *NO_MASTER, "--enable-module-command", "no", "--enable-debug-command", "no",
                "--logfile", str(log), "--daemonize", "no"]
        server = ScratchServer("redis-server", argv, sandbox, ready=lambda: _loaded(endpoint), log=log,
                               log_filter=_log_lines)
        try:
            server.start(timeout=load_timeout)
        except ScratchFailed as exc:
            if any(word in _read(log) for word in REFUSALS):
                raise IntegrityError(f"redis-server refused the RDB: {server.log_tail(lines=3)}") from None
            raise DriverError(str(exc)) from None
        except BaseException:
            server.stop()
            raise
        try:
            yield endpoint, server
        finally:
            server.stop()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def _read(log: Path) -> str:
    try:
        return log.read_text(errors="replace")
    except OSError:
        return ""


def _loaded(endpoint: Endpoint) -> bool:
    """True once the server answers PING (not LOADING)."""
    if not Path(endpoint.path or "").exists():
        return False
    try:
        with Connection(endpoint, timeout=10, connect_timeout=2) as conn:
            conn.command("PING")
            return True
    except RedisReplyError as exc:
        if str(exc).startswith("LOADING"):
            return False
        raise DriverError(f"scratch redis-server: {exc}") from None
    except DriverError:
        return False  # not accepting yet
