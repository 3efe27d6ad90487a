"""When the archived WAL's newest commit happened, read with pg_waldump from its newest segments.

PostgreSQL (13 and later) fails recovery with "recovery ended before configured
recovery target was reached" when ``recovery_target_time`` lies after the last
commit or abort it replays: it stops only at a transaction record later than the
target. The archive's own clock (when a segment arrived) is later than that commit,
so a target between the two passes the window check and then fails after a whole
replay. Knowing the newest commit lets restore replay to the end of the archive
instead, which is the state at such a target: nothing committed in between.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, ContextManager, BinaryIO

from backupd.errors import DriverError
from backupd.tool import Tool

COMMIT_TIME_RE = re.compile(r"desc: (?:COMMIT|ABORT)(?:_PREPARED)?\b.*? (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")
#: Segments read back from the newest before giving up: a quiet server switches segments holding no commit.
LOOK_BACK = 3
TIMEOUT = 60


def commit_times(output: str) -> list[dt.datetime]:
    """Commit and abort times in pg_waldump's output (run with TZ=UTC)."""
    found = []
    for match in COMMIT_TIME_RE.finditer(output):
        stamp = match[1] if "." in match[1] else match[1] + ".0"
        found.append(dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.timezone.utc))
    return found


def newest_commit(pg_waldump: str, segments: list[str],
                  open_segment: Callable[[str], ContextManager[BinaryIO]]) -> dt.datetime | None:
    """The newest commit/abort time in the last of ``segments`` (file names, oldest first) that has one.

    None when none of the last LOOK_BACK segments holds one or pg_waldump cannot read them:
    the caller then keeps the target as given."""
    with tempfile.TemporaryDirectory(prefix="backupd-waldump-") as scratch:
        for filename in reversed(segments[-LOOK_BACK:]):
            path = Path(scratch) / filename
            with open_segment(filename) as stream, open(path, "wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
            try:
                # It exits 1 at the end of the written WAL ("invalid record length"): what it printed counts.
                with Tool([pg_waldump, "--rmgr=Transaction", "--path", scratch, filename],
                          env={**os.environ, "TZ": "UTC"}) as waldump:
                    printed, _ = waldump.proc.communicate(timeout=TIMEOUT)
            except (DriverError, subprocess.TimeoutExpired):
                return None
            finally:
                path.unlink()
            if times := commit_times(printed.decode(errors="replace")):
                return max(times)
    return None
