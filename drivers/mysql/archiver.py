"""Continuous binlog archiving: a supervised ``mysqlbinlog --read-from-remote-server --raw --stop-never``.

mysqlbinlog writes byte-identical copies of the server's binlogs into a spool
directory and follows rotations, but exits for good when the connection drops
(server restart, network). This archiver restarts it with backoff from the
first file not yet archived complete, so the archived sequence has no gap; it
ships each closed file (last event Rotate or Stop) as ``<server>/<file>`` and,
every ``binlog_flush_interval``, the file still being written, cut at its last
complete event, as ``<server>/<file>.partial``, bounding what a lost host takes
with it. A file the server purged before it was archived is a gap: counted in
``backupd_archive_gaps_total`` and logged by name. ``backupd_archive_lag_seconds`` is the
age of the oldest event not yet durable (read from the spooled files, so a restarted
archiver reports it at once), and while the server cannot be reached, at least the time
since it was last reached; meanwhile ``source_error()`` tells the daemon the archiver is down.
"""

from __future__ import annotations

import contextlib
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import structlog

from backupd import gaps, pushes
from backupd.served_metrics import served
from backupd.errors import BackupdError, DriverError
from backupd.logarchive import LogArchive, LogConflict
from backupd.tool import DEVNULL, Tool
from drivers.mysql import binlog
from drivers.mysql.client import Credentials, query, tool_path
from drivers.mysql.logical import server_info
from drivers.mysql.pitr import PARTIAL, archived_files

log = structlog.get_logger(__name__)
POLL_SECONDS = 0.2
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
HEALTHY_RUN_SECONDS = 60.0
SOURCE_SETTLE_SECONDS = 5.0  # streaming this long after a failure: the server is reached again


def streamer_server_id(job: str, configured: int) -> int:
    """The replica id mysqlbinlog announces: configured, else a stable one derived from the job."""
    return configured or 1_000_000_000 + zlib.crc32(job.encode()) % 1_000_000_000


@dataclass
class _Spooled:
    path: Path
    scanner: binlog.Scanner
    partial_pushed: int = 0  # bytes of this file already durable as a .partial object


class BinlogArchiver:
    def __init__(self, job: str, credentials: Credentials, archive: LogArchive, spool: Path,
                 flush_interval: float, replica_id: int) -> None:
        self.name = f"binlog:{job}"
        self.job = job
        self.credentials = credentials
        self.archive = archive
        self.spool = spool
        self.flush_interval = flush_interval
        self.replica_id = replica_id
        self.backoff_initial = BACKOFF_INITIAL
        self.backoff_max = BACKOFF_MAX
        self.process: Tool | None = None  # the current mysqlbinlog, for observers (tests, status)
        self.sessions = 0
        self._files: dict[str, _Spooled] = {}
        self._last_flush = 0.0
        self._source_error: str | None = None
        self._unreachable_since: float | None = None

    def source_error(self) -> str | None:
        """Why the server cannot be streamed from, while it cannot (the daemon reports the archiver down)."""
        return self._source_error

    # ---- supervision -------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Archive until ``stop``; restart mysqlbinlog with backoff whenever it exits."""
        backoff = self.backoff_initial
        while not stop.is_set():
            started = time.monotonic()
            try:
                self._session(stop)
            except LogConflict:
                raise  # another server writes into this job: never paper over it
            except BackupdError as exc:
                log.warning("binlog streaming interrupted; restarting", job=self.job, error=str(exc),
                            retry_in=round(backoff, 1))
                self._source_error = str(exc)
                if self._unreachable_since is None:
                    self._unreachable_since = time.time()
                self._set_lag()
            if stop.is_set():
                break
            if time.monotonic() - started > HEALTHY_RUN_SECONDS:
                backoff = self.backoff_initial
            self._pause(stop, backoff)
            backoff = min(backoff * 2, self.backoff_max)

    def _pause(self, stop: threading.Event, seconds: float) -> None:
        """Wait out a backoff, keeping the lag current: it grows while the server is unreachable."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not stop.wait(min(left, 1.0)):
            self._set_lag()

    def _session(self, stop: threading.Event) -> None:
        conn = self.credentials.connect()
        try:
            info = server_info(conn)
            if not info.log_bin:
                raise DriverError(f"{self.credentials.endpoint}: log_bin is OFF; there are no binlogs to archive")
            on_server = [str(row[0]) for row in query(conn, "SHOW BINARY LOGS")]
        finally:
            conn.close()
        directory = self.spool / info.key
        directory.mkdir(parents=True, exist_ok=True)
        self._files = {}
        self._ship(directory, info.key, final=True)  # leftovers of a killed run, before they are overwritten
        start = self._start_file(info.key, on_server)
        archived = {f.name for f in archived_files(self.archive, info.key).values() if not f.partial}
        for path in directory.iterdir():  # stale copies of files already archived complete
            if path.name in archived and binlog.split_name(path.name)[1] < binlog.split_name(start)[1]:
                path.unlink()
                self._files.pop(path.name, None)
        self.sessions += 1
        with self.credentials.defaults_file(self.spool) as defaults:
            argv = [tool_path("binlog"), f"--defaults-extra-file={defaults}", "--read-from-remote-server", "--raw",
                    "--stop-never", f"--stop-never-slave-server-id={self.replica_id}",
                    f"--result-file={directory}/", start]
            log.info("binlog streaming started", job=self.job, server=info.key, start=start)
            with Tool(argv, stdout=DEVNULL) as tool:
                self.process = tool
                streaming = time.monotonic()
                try:
                    while not stop.is_set() and tool.proc.poll() is None:
                        if self._source_error and time.monotonic() - streaming >= SOURCE_SETTLE_SECONDS:
                            self._source_error = self._unreachable_since = None  # reached and stays reached
                        self._ship(directory, info.key)
                        stop.wait(POLL_SECONDS)
                    exited = tool.proc.poll()
                    tool.kill()
                    self._ship(directory, info.key, final=True)
                finally:
                    self.process = None
                if exited is not None and not stop.is_set():
                    raise tool.failure(exited)

    def _start_file(self, server: str, on_server: list[str]) -> str:
        """The first binlog not archived complete; a purged one in between is a gap."""
        if not on_server:
            raise DriverError("the server lists no binary logs")
        available = {binlog.split_name(name)[1]: name for name in on_server}
        complete = [i for i, f in archived_files(self.archive, server).items() if not f.partial]
        if not complete:
            return on_server[0]
        wanted = max(complete) + 1
        later = sorted(i for i in available if i >= wanted)
        if not later:
            return on_server[-1]
        if later[0] > wanted:
            base, _ = binlog.split_name(on_server[0])
            missing = [binlog.file_name(base, i) for i in range(wanted, later[0])]
            gaps.record(self.job, [f"missing binlog {server}/{name}" for name in missing])
            log.error("binlogs purged from the server before they were archived: PITR cannot cross this gap",
                      job=self.job, missing=[f"{server}/{name}" for name in missing])
        return available[later[0]]

    # ---- shipping ------------------------------------------------------------------

    def _ship(self, directory: Path, server: str, final: bool = False) -> None:
        names = sorted((p.name for p in directory.iterdir() if binlog.NAME_RE.match(p.name)),
                       key=lambda n: binlog.split_name(n)[1])
        flush_due = final or time.monotonic() - self._last_flush >= self.flush_interval
        for name in names:
            spooled = self._spooled(directory / name)
            if spooled is None:
                continue
            spooled.scanner.scan()
            if spooled.scanner.closed:
                self._push(server, spooled, complete=True)
                continue
            if spooled.scanner.offset > max(spooled.partial_pushed, 4) and flush_due:
                self._push(server, spooled, complete=False)
        if flush_due:
            self._last_flush = time.monotonic()
        self._set_lag()

    def _set_lag(self) -> None:
        """The age of the oldest spooled event not yet durable; while the server is unreachable,
        at least the time since it was last reached (what it wrote since is not archived)."""
        oldest = self._unreachable_since
        for spooled in list(self._files.values()):
            if spooled.scanner.offset > max(spooled.partial_pushed, 4):
                with contextlib.suppress(OSError):
                    written = binlog.event_time(spooled.path, spooled.partial_pushed)
                    oldest = written if oldest is None else min(oldest, written)
        if metrics := served():
            metrics.ARCHIVE_LAG.labels(self.job).set(max(0.0, time.time() - oldest) if oldest is not None else 0.0)

    def _spooled(self, path: Path) -> _Spooled | None:
        spooled = self._files.get(path.name)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        if spooled is None or size < spooled.scanner.offset:  # new, or rewritten by a restarted stream
            spooled = _Spooled(path, binlog.Scanner(path), self._partial_size(path))
            self._files[path.name] = spooled
        return spooled

    def _partial_size(self, path: Path) -> int:
        server = path.parent.name
        try:
            return self.archive.stat(f"{server}/{path.name}{PARTIAL}").raw_size or 0
        except BackupdError:
            return 0

    def _push(self, server: str, spooled: _Spooled, *, complete: bool) -> bool:
        name = f"{server}/{spooled.path.name}"
        try:
            if complete:
                result = self.archive.push_file(name, spooled.path)
                with contextlib.suppress(BackupdError):
                    if self.archive.exists(name + PARTIAL):
                        self.archive.delete(name + PARTIAL)
                spooled.path.unlink()
                self._files.pop(spooled.path.name, None)
            else:
                result = self._push_partial(name, spooled)
        except LogConflict as exc:
            pushes.failed(self.job, exc)
            raise
        except (BackupdError, OSError) as exc:
            pushes.failed(self.job, exc)
            log.warning("binlog push failed; will retry", job=self.job, binlog=name, error=str(exc))
            return False
        pushes.succeeded(self.job)
        log.info("binlog archived", job=self.job, binlog=name + ("" if complete else PARTIAL),
                 bytes=result.raw_size, status=result.status)
        return True

    def _push_partial(self, name: str, spooled: _Spooled):  # type: ignore[no-untyped-def]
        size = spooled.scanner.offset
        tmp = self.spool / f".{spooled.path.name}.partial.tmp"
        try:
            with open(spooled.path, "rb") as src, open(tmp, "wb") as out:
                remaining = size
                while remaining:
                    chunk = src.read(min(remaining, 1 << 20))
                    if not chunk:
                        raise DriverError(f"{spooled.path}: shrank while being copied")
                    out.write(chunk)
                    remaining -= len(chunk)
            result = self.archive.push_file(name + PARTIAL, tmp, replace=True)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        spooled.partial_pushed = size
        return result
