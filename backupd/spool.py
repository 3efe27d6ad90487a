"""The wal-fetch spool: where a driver's background prefetcher leaves archived logs for a restore
command that asks for one file at a time (PostgreSQL's restore_command).

The server runs the restore command once per file and waits for it, so every
call should be a rename out of this directory. The prefetcher (a detached
``backupd wal-fetch --prefetch-from NAME``, one per spool, holding ``LOCK``;
the driver's ``WalArchiving.wal_prefetch``) keeps the next logs here and answers
for the ones the archive lacks; the per-file fast path (``backupd.cli.quick``)
and the full ``wal-fetch`` read it. Which names exist and how they follow each
other is the driver's business: here a name is any plain file name, and logs
"ahead" of one are the spooled files that sort after it.

Files, all in ``state_dir/spool/<job>/wal-fetch``:

- ``<name>``: a complete copy of an archived file (written elsewhere, then renamed in).
- ``.absent-<name>``: the prefetcher found ``<name>`` missing from the archive; it
  touches the marker each time it looks again, so a marker younger than
  ``ABSENT_TTL`` seconds is as good as asking the archive.
- ``.keep-<name>``: ``<name>`` is the newest log archived; the server asks for it
  again at the end of recovery, so it is delivered by copy and stays.
- ``.wanted``: the name a caller waits for; the prefetcher fetches it next.
- ``.prefetch.lock``: flock held by the running prefetcher; its mtime is the time
  of the newest delivery (the prefetcher leaves when nobody has asked for a while).

Import-light on purpose (``os`` only): the fast path runs once per WAL segment.
"""

from __future__ import annotations

import errno
import os
import time

LOCK = ".prefetch.lock"
ABSENT = ".absent-"
KEEP = ".keep-"
WANTED = ".wanted"
LOG = "prefetch.log"
ABSENT_TTL = 3.0
MAX_NAME = 128
NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def directory(state_dir: str, job: str) -> str:
    return os.path.join(state_dir, "spool", job, "wal-fetch")


def servable(name: str) -> bool:
    """Whether ``name`` can be a spooled log: a plain file name (never a path, a marker or the lock)."""
    return 0 < len(name) <= MAX_NAME and not name.startswith(".") and NAME_CHARS.issuperset(name) and name != LOG


def deliver(spool: str, name: str, dest: str) -> bool:
    """Move (or, for the newest archived segment, copy) ``<spool>/<name>`` to ``dest``; False if not spooled.

    ``dest`` appears complete or not at all (written beside it, then renamed).
    """
    source = os.path.join(spool, name)
    tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{os.getpid()}.part")
    try:
        if os.path.exists(os.path.join(spool, KEEP + name)):
            _copy(source, tmp)
        else:
            try:
                os.rename(source, tmp)
            except OSError as exc:
                if exc.errno != errno.EXDEV:  # the spool is on another file system
                    raise
                _copy(source, tmp)
                os.unlink(source)
        os.rename(tmp, dest)
    except FileNotFoundError:
        _remove(tmp)
        return False
    except BaseException:
        _remove(tmp)
        raise
    return True


def absent(spool: str, name: str, now: float | None = None) -> bool:
    """True when the running prefetcher found ``name`` missing from the archive within ``ABSENT_TTL``."""
    try:
        seen = os.stat(os.path.join(spool, ABSENT + name)).st_mtime
    except OSError:
        return False
    return (now if now is not None else time.time()) - seen < ABSENT_TTL


def prefetcher_running(spool: str) -> bool:
    import fcntl

    try:
        fd = os.open(os.path.join(spool, LOCK), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock if we just took it
    return False


def ask(spool: str, name: str, dest: str, timeout: float) -> bool | None:
    """Ask the running prefetcher for ``name`` and wait; True delivered, False absent, None no answer in time."""
    wanted = os.path.join(spool, WANTED)
    tmp = f"{wanted}.{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(name)
    os.rename(tmp, wanted)
    asked = time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if deliver(spool, name, dest):
            return True
        try:
            if os.stat(os.path.join(spool, ABSENT + name)).st_mtime >= asked - 0.01:
                return False
        except OSError:
            pass
        time.sleep(0.005)
    return None


def touch(spool: str) -> None:
    """Tell the prefetcher replay is still asking (it leaves after a quiet spell)."""
    try:
        os.utime(os.path.join(spool, LOCK))
    except OSError:
        pass


def ahead(spool: str, name: str) -> int:
    """Spooled logs that sort after ``name`` (the prefetcher keeps the next ones there)."""
    try:
        entries = os.listdir(spool)
    except OSError:
        return 0
    return sum(1 for entry in entries if entry > name and servable(entry))


def start_prefetcher(spool: str, config: str | None, job: str, name: str, *, after: bool,
                     user: tuple[int, int] | None = None) -> bool:
    """Start the background prefetcher (a detached ``backupd wal-fetch --prefetch-from NAME``) from
    ``name``, or the segment after it, unless one runs; False when none was started.

    ``config`` is the configuration file as an absolute path (None: the child finds
    the default itself). Run as ourselves, the lock is taken here and handed over
    (``--lock-fd``), so the calls that follow at once already see a prefetcher at
    work. Started for another OS user (``user`` = uid, gid; a root restore for
    PostgreSQL), the child takes the lock itself, so every spool file stays that user's.
    """
    import sys

    argv = [sys.executable, "-m", "backupd", *(("--config", config) if config else ()), "--log-format", "json",
            "wal-fetch", "--job", job, "--prefetch-from" if not after else "--prefetch-after", name]
    try:
        return _start(spool, argv, user)
    except OSError:
        return False


def _start(spool: str, argv: list[str], user: tuple[int, int] | None) -> bool:
    import fcntl
    import subprocess

    if user is not None:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, user=user[0], group=user[1], extra_groups=[], cwd="/")
        return True
    try:
        os.makedirs(spool, exist_ok=True)
        lock = os.open(os.path.join(spool, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # one is at work
        subprocess.Popen([*argv, "--lock-fd", str(lock)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, pass_fds=(lock,))
        return True
    finally:
        os.close(lock)  # the child's copy keeps the lock until it exits


def _copy(source: str, dest: str) -> None:
    with open(source, "rb") as src, open(dest, "wb") as out:
        remaining = os.fstat(src.fileno()).st_size
        while remaining > 0:
            sent = os.sendfile(out.fileno(), src.fileno(), None, min(remaining, 1 << 30))
            if sent == 0:
                break
            remaining -= sent


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
