"""The real MongoDB Database Tools and the SecantusDB ``mongod`` stand-in (tests/mongod_standin.py) for tests.

The tools are the real ``mongodump``/``mongorestore`` 100.18 in ``../shared/tools/mongo-tools/``
beside the repository (see ENVIRONMENT.md); under ``CI=true`` their absence fails the test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import REPO_ROOT

MONGO_TOOLS = REPO_ROOT.parent / "shared" / "tools" / "mongo-tools"
STANDIN = REPO_ROOT / "tests" / "mongod_standin.py"


def require_mongo_tools() -> Path:
    """The directory holding the real mongodump and mongorestore; missing fails under CI=true."""
    if all((MONGO_TOOLS / name).is_file() and os.access(MONGO_TOOLS / name, os.X_OK)
           for name in ("mongodump", "mongorestore")):
        return MONGO_TOOLS
    message = f"the real MongoDB Database Tools are not in {MONGO_TOOLS} (see ENVIRONMENT.md, MongoDB)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def tools_env() -> dict[str, str]:
    """The environment for a backupd child: the real tools first on PATH."""
    return {"PATH": f"{require_mongo_tools()}{os.pathsep}{os.environ.get('PATH', '')}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Standin:
    """One running stand-in mongod."""

    proc: subprocess.Popen
    port: int
    directory: Path

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def client(self):  # type: ignore[no-untyped-def]
        import pymongo

        return pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=20000)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_standin(directory: Path, replica_set: str | None = "rs0", oplog_max_entries: int | None = None
                  ) -> Standin:
    directory.mkdir(parents=True)
    port = free_port()
    argv = [sys.executable, str(STANDIN), "--dbpath", str(directory / "db"), "--port", str(port),
            "--bind_ip", "127.0.0.1", "--logpath", str(directory / "mongod.log"), "--unixSocketPrefix", str(directory)]
    if replica_set:
        argv += ["--replSet", replica_set]
    if oplog_max_entries:
        argv += ["--oplogMaxEntries", str(oplog_max_entries)]
    (directory / "db").mkdir()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(directory / "stderr.log", "wb"))
    server = Standin(proc, port, directory)
    client = server.client()
    deadline = time.monotonic() + 30
    while True:
        try:
            client.admin.command("ping")
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise AssertionError(f"the stand-in mongod did not start: "
                                     f"{(directory / 'stderr.log').read_text()[-2000:]}") from None
            time.sleep(0.2)
    client.close()
    return server


def install_standin_binary() -> Path:
    """An executable ``mongod`` (the stand-in under this virtual environment's Python) for a job's ``mongod``
    option, in a directory the scratch user can read; the job also needs ``mongod_readable = [sys.prefix]``."""
    directory = Path(tempfile.mkdtemp(prefix="mongod-standin-"))
    directory.chmod(0o755)
    path = directory / "mongod"
    path.write_text(f"#!{sys.executable}\n" + STANDIN.read_text())
    path.chmod(0o755)
    return path
