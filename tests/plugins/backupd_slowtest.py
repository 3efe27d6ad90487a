"""A test driver whose backup is a slow native-tool-like child process, and a flaky log archiver.

Only for the daemon tests: ``PYTHONPATH=tests/plugins`` makes the entry point in
``backupd_testplugins-0.0.dist-info`` visible to a ``backupd`` child process.
The backup streams the stdout of a child that writes ``size`` random bytes at
``rate`` bytes per second, and kills it if the stream is aborted (as every real
driver must). The child's pid is written to ``workdir/child.pid``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

from backupd.driver import BackupResult, BackupSource, Check, Driver, DriverOptions, RestoreRequest, StreamSink, VerifyOutcome
from backupd.errors import DriverError, IntegrityError
from backupd.tool import DEVNULL, Tool

TRICKLE = """
import os, sys, time
size, rate = int(sys.argv[1]), int(sys.argv[2])
chunk = 64 * 1024
sent, start = 0, time.monotonic()
out = sys.stdout.buffer
while sent < size:
    block = os.urandom(min(chunk, size - sent))
    out.write(block)
    out.flush()
    sent += len(block)
    ahead = sent / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
"""


class SlowOptions(DriverOptions):
    workdir: Path
    size: int = 1 << 20
    rate: int = 64 << 20
    #: The archiver raises this many times (counted in workdir/archiver.attempts) before it runs.
    archiver_failures: int = 0
    #: Each failing attempt runs this long before it raises (an archiver that connects, then drops).
    archiver_fails_after: float = 0.0
    #: Verification's scratch restore "rejects the content" with this message (IntegrityError), as a
    #: real driver does when pg_restore or the client refuses a dump; the text stands for restored content.
    verify_error: str | None = None
    #: Verification's scratch restore is a native tool that runs this long (its pid in workdir/verify.pid).
    verify_seconds: float = 0.0


class FlakyArchiver:
    def __init__(self, driver: "SlowDriver") -> None:
        self.name = f"slowlog:{driver.context.job}"
        self.options = driver.options

    def run(self, stop: threading.Event) -> None:
        attempts = self.options.workdir / "archiver.attempts"
        count = int(attempts.read_text()) + 1 if attempts.exists() else 1
        attempts.write_text(str(count))
        if count <= self.options.archiver_failures:
            stop.wait(self.options.archiver_fails_after)
            raise DriverError(f"archiver attempt {count} failed on purpose")
        while not stop.wait(0.1):
            (self.options.workdir / "archiver.heartbeat").write_text(str(time.time()))


class SlowDriver(Driver):
    methods = ("logical",)
    options_model = SlowOptions

    def backup(self, method: str, sink: StreamSink) -> BackupResult:
        workdir = self.options.workdir
        proc = subprocess.Popen([sys.executable, "-c", TRICKLE, str(self.options.size), str(self.options.rate)],
                                stdout=subprocess.PIPE)
        (workdir / "child.pid").write_text(str(proc.pid))
        try:
            entry = sink("data", proc.stdout)
            if proc.wait() != 0:
                raise DriverError(f"trickle child exited {proc.returncode}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        return BackupResult(metadata={"size": entry.raw_size}, row_counts={"bytes": entry.raw_size},
                            tool_versions={"python": sys.version.split()[0]})

    def restore(self, source: BackupSource, request: RestoreRequest) -> str:
        with source.open("data") as stream, open(request.to, "wb") as out:
            while chunk := stream.read(1 << 20):
                out.write(chunk)
        return f"restored to {request.to}"

    def verify(self, source: BackupSource, scratch: Path, checks: list[str]) -> VerifyOutcome:
        size = 0
        with source.open("data") as stream:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
        if self.options.verify_error:
            raise IntegrityError(f"scratch restore rejected the backup: {self.options.verify_error}")
        if self.options.verify_seconds:
            with Tool(["sleep", str(self.options.verify_seconds)], stdout=DEVNULL) as restoring:
                (self.options.workdir / "verify.pid").write_text(str(restoring.pid))
                restoring.check()
        return VerifyOutcome(row_counts={"bytes": size})

    def log_archivers(self) -> list[FlakyArchiver]:
        return [FlakyArchiver(self)]

    def control_handlers(self):
        return {"echo": lambda message: {"ok": True, "job": self.context.job, "pid": os.getpid(),
                                         "echo": message.get("data")}}

    def check(self) -> Iterable[Check]:
        yield Check("workdir", self.options.workdir.is_dir(), str(self.options.workdir))
