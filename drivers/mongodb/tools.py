"""The argv of mongodump and mongorestore, and the 0600 --config file that carries the credentials.

The connection string and password reach the tools only through a YAML file
given with ``--config`` (mongo-tools read ``uri`` and ``password`` from it),
created 0600 in the job's spool directory and removed afterwards, so neither
appears in argv (``ps``) nor in logs. The tools themselves run through
``backupd.tool``.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterator, Sequence

from backupd import tool

HINT = "install the MongoDB Database Tools (mongodump, mongorestore)"


def find_tool(name: str) -> str:
    return tool.find_tool(name, hint=HINT)


def tool_version(name: str) -> str:
    """``mongodump --version`` -> "100.9.4" (the first line's last word)."""
    return tool.tool_version(find_tool(name), lambda text: (text.splitlines() or ["unknown"])[0].split()[-1])


@contextlib.contextmanager
def config_file(directory: Path, uri: str, password: str | None) -> Iterator[Path]:
    """A 0600 YAML file holding ``uri`` (and ``password``), removed on exit."""
    path = directory / f".mongo-tools-{uuid.uuid4().hex[:12]}.yaml"
    lines = [f"uri: {json.dumps(uri)}"]  # a JSON string is a valid YAML double-quoted scalar
    if password is not None:
        lines.append(f"password: {json.dumps(password)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def dump_argv(config: Path, *, oplog: bool) -> list[str]:
    """Always the whole server: mongodump has no --nsInclude, and --oplog only works on full dumps
    (a job's ``databases`` filter applies on restore)."""
    argv = [find_tool("mongodump"), f"--config={config}", "--archive"]
    if oplog:
        argv.append("--oplog")
    return argv


def restore_argv(config: Path, *, archive: bool = True, oplog_replay: bool = False, oplog_limit: str | None = None,
                 namespaces: Sequence[str] = (), drop: bool = False, directory: Path | None = None,
                 jobs: int = 1) -> list[str]:
    argv = [find_tool("mongorestore"), f"--config={config}"]
    if archive:
        argv.append("--archive")
    if oplog_replay:
        argv.append("--oplogReplay")
    if oplog_limit:
        argv.append(f"--oplogLimit={oplog_limit}")
    argv += [f"--nsInclude={ns}" for ns in namespaces]
    if drop:
        argv.append("--drop")
    if jobs > 1:
        argv.append(f"--numParallelCollections={jobs}")
    argv.append("--stopOnError")
    if directory is not None:
        argv.append(f"--dir={directory}")
    return argv
