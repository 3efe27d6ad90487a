"""The drill's WAL stager: the restore_command script inside the sandbox and the feeder thread in backupd."""

from __future__ import annotations

import io
import subprocess
import threading
from pathlib import Path
from typing import BinaryIO

from drivers.postgres.walstage import WalStager

SEGMENTS = [f"00000001000000000000000{n}" for n in range(1, 9)]
HISTORY = "00000002.history"


class FakeArchive:
    def __init__(self, broken: str | None = None) -> None:
        self.opened: list[str] = []
        self.broken = broken
        self.lock = threading.Lock()

    def open_log(self, kind: str, name: str) -> BinaryIO:
        assert kind == "wal"
        with self.lock:
            self.opened.append(name)
        if self.broken and name.endswith(self.broken):
            raise OSError(f"cannot decrypt {name}")
        return io.BytesIO(f"content of {name}".encode())


def fetch(stager: WalStager, name: str, dest: Path, timeout: float = 20) -> int:
    """Run the script as PostgreSQL would (restore_command with %f %p)."""
    return subprocess.run(["sh", str(stager.script), name, str(dest)], timeout=timeout).returncode


def test_script_serves_listed_files_and_says_not_found_for_others(tmp_path: Path) -> None:
    archive = FakeArchive()
    stager = WalStager(tmp_path / "stage", SEGMENTS, [HISTORY], archive.open_log, None, first=SEGMENTS[0], ahead=2)
    stager.start()
    try:
        assert fetch(stager, "00000003.history", tmp_path / "x", timeout=5) == 1  # not in the archive: at once
        assert not (tmp_path / "x").exists()
        assert fetch(stager, HISTORY, tmp_path / "h") == 0
        assert (tmp_path / "h").read_text() == f"content of 00000002/{HISTORY}"
        for name in SEGMENTS[:4]:
            assert fetch(stager, name, tmp_path / "RECOVERYXLOG") == 0
            assert (tmp_path / "RECOVERYXLOG").read_text() == f"content of 00000001/{name}"
            assert not (stager.directory / name).exists()  # copied segments leave the stage
        assert fetch(stager, SEGMENTS[1], tmp_path / "again") == 0  # asked again: staged again
        staged = {p.name for p in stager.directory.iterdir() if p.name.startswith("0000000100")}
        assert staged <= set(SEGMENTS[4:7])  # bounded: at most `ahead` past the newest asked
    finally:
        stager.stop()
    assert stager.error is None
    assert oct((stager.directory / HISTORY).stat().st_mode & 0o777) == "0o600"


def test_a_file_that_cannot_be_read_ends_the_wait_and_is_reported(tmp_path: Path) -> None:
    archive = FakeArchive(broken=SEGMENTS[2])
    stager = WalStager(tmp_path / "stage", SEGMENTS, [], archive.open_log, None, first=SEGMENTS[0], ahead=1)
    stager.start()
    try:
        assert fetch(stager, SEGMENTS[0], tmp_path / "a") == 0
        assert fetch(stager, SEGMENTS[2], tmp_path / "b") == 1
    finally:
        stager.stop()
    assert stager.error is not None and SEGMENTS[2] in stager.error
