"""One data connection of a parallel dump load: whole INSERT statements run in turn, a deadlock victim run again.

The loader (drivers.mysql.loader) hands a connection whole statements through a
small bounded queue; a thread of its own replays the dump's header ``SET``
statements once, then runs each statement with ``query`` under autocommit. A
statement that InnoDB rolled back as a deadlock victim (error 1213) or after a
lock wait timeout (1205) is run again, a bounded number of times after a short,
growing pause: under autocommit it was rolled back whole, so running it again
neither loses nor doubles a row. Any other error, or the last attempt failing,
stops the thread; the loader then raises ``ContentRejected`` (the server's error
number, none of its message, which may quote the dump) at its next ``put``,
``sync`` or ``finish``. Statements after a failure are dropped unread, so
``put`` never blocks on a stopped thread.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from typing import Callable, Sequence

import pymysql
import pymysql.constants.ER
import structlog

from backupd.errors import DriverError
from drivers.mysql.client import ContentRejected, Credentials

log = structlog.get_logger(__name__)

#: Statements waiting per connection: memory stays below QUEUE_DEPTH x the dump's statement size.
QUEUE_DEPTH = 4
#: Server errors after which InnoDB has rolled the statement back: deadlock victim, lock wait timeout.
RETRIED = (pymysql.constants.ER.LOCK_DEADLOCK, pymysql.constants.ER.LOCK_WAIT_TIMEOUT)
ATTEMPTS = 10
#: Seconds before the n-th attempt again: n x RETRY_PAUSE.
RETRY_PAUSE = 0.05
_ERROR_NAMES = {value: name for name, value in vars(pymysql.constants.ER).items()
                if name.isupper() and isinstance(value, int)}


class DataClient:
    """A connection and its thread; ``put`` statements, ``sync`` to wait for them, ``finish`` or ``close``."""

    def __init__(self, credentials: Credentials, preamble: Sequence[bytes], number: int) -> None:
        self.database: bytes | None = None  # as of the last USE put (the loader's side)
        self.name = f"data connection {number}"
        self._endpoint = credentials.endpoint
        self._conn = credentials.connect()
        self._preamble = list(preamble)
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._stop = threading.Event()
        self._failure: DriverError | None = None
        self._thread = threading.Thread(target=self._run, name=f"mysql-load-{number}", daemon=True)
        self._thread.start()

    # ---- the loader's side ----------------------------------------------------------------

    def put(self, statement: bytes) -> None:
        self._check()
        self._queue.put(statement)

    def sync(self) -> None:
        """Every statement put so far has run (committed) or the load fails here."""
        self._queue.join()
        self._check()

    def finish(self) -> None:
        self._end()
        self._check()

    def close(self) -> None:
        """Stop without running what is still queued (a failure elsewhere); the connection is closed."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
                self._queue.task_done()
        self._end()

    def _end(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)  # the thread takes statements until this one, so the queue has room for it
        self._thread.join()

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure

    # ---- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._guarded(self._replay_preamble)
            while (statement := self._queue.get()) is not None:
                try:
                    if self._failure is None and not self._stop.is_set():
                        self._guarded(functools.partial(self._execute, statement))
                finally:
                    self._queue.task_done()
            self._queue.task_done()
        finally:
            with contextlib.suppress(Exception):
                self._conn.close()

    def _guarded(self, action: Callable[[], None]) -> None:
        try:
            action()
        except pymysql.MySQLError as exc:
            self._failure = self._rejected(exc, 1)
        except Exception as exc:  # the loader raises it in its own thread
            self._failure = DriverError(f"{self._endpoint}: {self.name} (loading the dump) failed: "
                                        f"{type(exc).__name__}")

    def _replay_preamble(self) -> None:
        for statement in self._preamble:
            self._conn.query(statement)

    def _execute(self, statement: bytes) -> None:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                self._conn.query(statement)
                return
            except pymysql.MySQLError as exc:
                # under autocommit the statement was its own transaction, rolled back whole
                if _code(exc) not in RETRIED or attempt == ATTEMPTS or not self._conn.get_autocommit():
                    self._failure = self._rejected(exc, attempt)
                    return
                log.warning("a dump statement was rolled back; running it again", connection=self.name,
                            error=_code(exc), attempt=attempt + 1, attempts=ATTEMPTS)
                if self._stop.wait(RETRY_PAUSE * attempt):
                    return

    def _rejected(self, exc: pymysql.MySQLError, attempts: int) -> ContentRejected:
        """The server's error number and name; its message may quote the dump, so it is left out."""
        code = _code(exc)
        error = f"ERROR {code}" + (f" ({_ERROR_NAMES[code]})" if code in _ERROR_NAMES else "")
        if attempts > 1:
            error += f", still after {attempts} attempts"
        brief = f"{self.name} (loading the dump) failed: {error}"
        return ContentRejected(f"{self._endpoint}: {brief}", brief)


def _code(exc: pymysql.MySQLError) -> int | None:
    return exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
