"""Archived WAL for a recovery that runs in the sandbox (the PITR drill).

The sandboxed server cannot run ``backupd wal-fetch``: it must see neither the
configuration, the identity nor state_dir. backupd stages WAL from outside
instead. The server's restore_command is a small sh script written into the
scratch: it answers "not in the archive" (exit 1) at once for a name the index
does not list, otherwise asks for the file (an empty file under ``want/``) and
waits until backupd has decrypted it into the stage directory. A feeder thread
in backupd serves what is asked and keeps a few segments ahead (written to a
temporary name, then renamed), so recovery rarely waits. The script deletes a
segment once copied; staging is bounded by ``ahead``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import BinaryIO, Callable

from backupd.pipeline import READ_CHUNK
from backupd.sandbox import chown_to
from drivers.postgres.walnames import archive_name

AHEAD = 4
POLL = 0.05
WAIT_LIMIT = 600  #: seconds the script waits for one file before giving up (exit 1)
SCRIPT = """#!/bin/sh
# restore_command written by backupd: %f %p. backupd (outside the sandbox) stages the files.
stage='{stage}'
f="$1"
grep -qxF -- "$f" "$stage/index" || exit 1
: > "$stage/want/$f" || exit 1
tries=0
while [ ! -f "$stage/$f" ]; do
    [ -e "$stage/failed" ] && exit 1
    [ "$tries" -ge {tries} ] && exit 1
    sleep {poll}
    tries=$((tries + 1))
done
cp "$stage/$f" "$2" || exit 1
rm -f "$stage/want/$f"
case "$f" in *.history) ;; *) rm -f "$stage/$f" ;; esac
exit 0
"""


class WalStager:
    """Serves ``names`` (archived WAL file names, segments sorted) from ``open_log`` into ``directory``."""

    def __init__(self, directory: Path, segments: list[str], histories: list[str],
                 open_log: Callable[[str, str], BinaryIO], user: str | None, first: str | None = None,
                 ahead: int = AHEAD) -> None:
        self.directory = directory
        self.segments = segments
        self.histories = histories
        self.open_log = open_log
        self.user = user
        self.ahead = ahead
        self.cursor = first
        self.error: str | None = None
        self.staged = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-wal-stage", daemon=True)
        self._position = {name: index for index, name in enumerate(segments)}

    @property
    def script(self) -> Path:
        return self.directory / "restore.sh"

    def restore_command(self) -> str:
        return f"'{self.script}' %f %p"

    def start(self) -> None:
        (self.directory / "want").mkdir(parents=True, mode=0o700)
        (self.directory / "index").write_text("".join(f"{name}\n" for name in [*self.histories, *self.segments]))
        self.script.write_text(SCRIPT.format(stage=self.directory, tries=int(WAIT_LIMIT / POLL), poll=POLL))
        os.chmod(self.script, 0o700)
        chown_to(self.directory, self.user)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._serve()
                self._stop.wait(POLL)
        except Exception as exc:  # reported by the drill; the script stops waiting
            self.error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):
                (self.directory / "failed").write_text(self.error)

    def _serve(self) -> None:
        wanted = sorted(os.listdir(self.directory / "want"))
        for name in wanted:
            if not (self.directory / name).exists():
                self._stage(name)
        asked = [name for name in wanted if name in self._position]
        if asked:
            self.cursor = max(asked, key=self._position.__getitem__)
        if self.cursor in self._position:
            start = self._position[self.cursor]
            for name in self.segments[start:start + self.ahead + 1]:
                if name[:8] != self.cursor[:8]:
                    break
                if self._position[name] > self._done and not (self.directory / name).exists():
                    self._stage(name)

    _done = -1  #: the furthest segment staged ahead so far (asked ones are staged again if asked again)

    def _stage(self, name: str) -> None:
        if self._stop.is_set():
            return
        final = self.directory / name
        partial = self.directory / f".{name}.tmp"
        with self.open_log("wal", archive_name(name)) as stream, open(partial, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            while chunk := stream.read(READ_CHUNK):
                out.write(chunk)
        chown_to(partial, self.user)
        partial.rename(final)
        self.staged += 1
        if name in self._position:
            self._done = max(self._done, self._position[name])
