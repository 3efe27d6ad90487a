"""SQLite: consistent online copies through the sqlite3 backup API.

The backup API copies the database as of one read transaction while writers
keep going (in WAL mode) or wait briefly (rollback journal). Row counts are
taken from that copy, so they describe exactly the snapshot that was stored.

Verification never opens the restored file in backupd's own process: the
integrity check, the row counts and the user's checks run in the sandbox
(``drivers/sqlite_probe.py`` under ``/usr/bin/python3 -I``), which sees only the
scratch copy. Every copy backupd writes (snapshot, restore, scratch) is 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from backupd.driver import BackupResult, BackupSource, Check, Driver, RestoreRequest, StreamSink, VerifyOutcome
from backupd import restore_to
from backupd.errors import DriverError, IntegrityError, UsageError, naming
from backupd.manifest import Manifest
from backupd.sandbox import chown_to
from backupd.tool import run
from backupd.usercheck import NO_ROW, Answer, judge

from drivers import sqlite_probe
from drivers.sqlite import DESCRIPTOR
from drivers.sqlite.options import SqliteOptions

STREAM = "db"
COPY_CHUNK = 1 << 20
#: The interpreter the sandboxed checks run with: Debian's, under /usr (the sandbox's only system tree).
PYTHON = "/usr/bin/python3"


def _answer(sql: object, value: object, error: object) -> Answer:
    """One check as ``sqlite_probe`` reports it: ``[sql, value, error]``."""
    if error:
        return Answer(str(sql), error=str(error))
    return Answer(str(sql), NO_ROW if value == {"no_row": True} else value)


def _connect(path: Path, timeout: float = 30.0, readonly: bool = False) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    try:
        return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise DriverError(f"{path}: cannot open SQLite database: {exc}") from None


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def table_counts(db: sqlite3.Connection) -> dict[str, int]:
    tables = [row[0] for row in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    return {table: db.execute(f"SELECT count(*) FROM {_quote(table)}").fetchone()[0] for table in tables}


def _create_private(path: Path) -> None:
    """An empty 0600 file: SQLite keeps the mode, and gives its journals the same."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


@contextlib.contextmanager
def _temp_path(directory: Path, stem: str) -> Iterator[Path]:
    path = directory / f".{stem}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield path
    finally:
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{suffix}")


class SqliteDriver(Driver):
    methods = DESCRIPTOR.methods
    options_model = SqliteOptions

    @property
    def path(self) -> Path:
        return self.options.path

    def _snapshot(self, dest: Path) -> None:
        if not self.path.is_file():
            raise DriverError(f"{self.path}: database file not found")
        _create_private(dest)
        source = _connect(self.path, self.options.busy_timeout)
        try:
            target = sqlite3.connect(dest)
            try:
                source.backup(target)  # all pages in one step: one consistent snapshot
            finally:
                target.close()
        except sqlite3.Error as exc:
            raise DriverError(f"{self.path}: backup API failed: {exc}") from None
        finally:
            source.close()

    def backup(self, method: str, sink: StreamSink) -> BackupResult:
        with _temp_path(self.context.spool_dir, "sqlite-backup") as copy:
            self._snapshot(copy)
            db = _connect(copy)
            try:
                counts = table_counts(db)
                page_size = db.execute("PRAGMA page_size").fetchone()[0]
                page_count = db.execute("PRAGMA page_count").fetchone()[0]
                journal_mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            finally:
                db.close()
            with open(copy, "rb") as handle:
                entry = sink(STREAM, handle)
            if entry.raw_size != copy.stat().st_size:
                raise DriverError(f"{copy}: stored {entry.raw_size} bytes of a {copy.stat().st_size}-byte copy")
        return BackupResult(
            metadata={"source": str(self.path), "page_size": page_size, "page_count": page_count,
                      "journal_mode": journal_mode},
            row_counts=counts,
            tool_versions={"sqlite": sqlite3.sqlite_version},
        )

    def _write(self, source: BackupSource, dest: Path) -> int:
        size = 0
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with naming(dest), source.open(STREAM) as stream, os.fdopen(fd, "wb") as out:
            while chunk := stream.read(COPY_CHUNK):
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        return size

    def check_to(self, request: RestoreRequest) -> None:
        restore_to.file(request.to, "sqlite")
        if request.tables:
            raise UsageError("the sqlite driver restores whole databases; --table is not supported")

    def check_target(self, manifest: Manifest, request: RestoreRequest) -> None:
        dest = restore_to.file(request.to, "sqlite")
        if dest.exists() and not request.force:
            raise DriverError(f"{dest}: file exists; refusing to overwrite it", hint="pass --force to replace it")

    def restore(self, source: BackupSource, request: RestoreRequest) -> str:
        self.check_to(request)
        self.check_target(source.manifest, request)
        dest = restore_to.file(request.to, "sqlite")
        with _temp_path(dest.parent, dest.name) as tmp:
            size = self._write(source, tmp)
            db = _connect(tmp)
            try:
                status = db.execute("PRAGMA quick_check").fetchone()[0]
            finally:
                db.close()
            if status != "ok":
                raise DriverError(f"restored database fails quick_check: {status}")
            for suffix in ("-wal", "-shm", "-journal"):  # stale logs would be replayed onto the new file
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{dest}{suffix}")
            os.replace(tmp, dest)
        manifest = source.manifest
        return f"restored backup {manifest.backup_id} of {manifest.job} to {dest} ({size} bytes)"

    def verify(self, source: BackupSource, scratch: Path, checks: list[str]) -> VerifyOutcome:
        """Restore into ``scratch`` and measure the copy in the sandbox; an unreadable file is an IntegrityError."""
        dest = scratch / "restore.sqlite3"
        size = self._write(source, dest)
        chown_to(scratch, self.scratch_user())
        sandbox = self.scratch_sandbox([scratch])
        request = json.dumps({"path": str(dest), "checks": list(checks)}).encode()
        out = run([PYTHON, "-I", "-c", Path(sqlite_probe.__file__).read_text()], input=request, sandbox=sandbox,
                  name="sqlite checks")
        try:
            found = json.loads(out)
        except ValueError:
            raise DriverError(f"sqlite checks: unreadable output ({out[:80]!r})") from None
        if "error" in found:
            raise IntegrityError(f"backup {source.manifest.backup_id}: the restored file is not a readable SQLite "
                                 f"database: {found['error']}")
        problems = [str(p) for p in found["integrity"]]
        outcome = VerifyOutcome(
            row_counts={str(t): int(n) for t, n in found["counts"].items()},
            steps=[{"step": "restore", "bytes": size}, {"step": "integrity_check", "result": problems[:10]}],
        )
        outcome.checks.append(Check("PRAGMA integrity_check", problems == ["ok"], "; ".join(problems[:5])))
        outcome.checks.extend(judge(_answer(*check)) for check in found["checks"])
        return outcome

    def check(self) -> Iterable[Check]:
        yield Check("sqlite library", True, sqlite3.sqlite_version)
        if not self.path.is_file():
            yield Check("database", False, f"{self.path}: database file not found")
            return
        try:
            db = _connect(self.path, readonly=True)
            try:
                db.execute("PRAGMA schema_version").fetchone()
                mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            finally:
                db.close()
            yield Check("database", True, f"{self.path}: readable, journal_mode={mode}")
        except (sqlite3.Error, DriverError) as exc:
            yield Check("database", False, f"{self.path}: {exc}")
