"""Helpers shared by the tests (not fixtures): tools, configs, running the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BACKUPD = [sys.executable, "-m", "backupd"]


def require_tool(name: str) -> str:
    """The tool's path; a missing tool fails under CI=true and skips elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (make test installs it: scripts/install-tools.sh)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_backupd(*args: str, config: Path | None = None, env: dict[str, str] | None = None,
                timeout: float = 120, check: bool = False, cwd: Path = REPO_ROOT) -> Result:
    """Run the real ``backupd`` in a child process, as an operator would."""
    argv = [*BACKUPD]
    if config is not None:
        argv += ["--config", str(config)]
    argv += ["--log-format", "json", *args]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"backupd {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return result


def stored_report(path: Path, identity_file: Path) -> dict:
    """A verification report from a filesystem repository, its sealed details opened (``backupd.sealed``)."""
    import json

    from backupd import age, sealed

    return sealed.unseal(json.loads(path.read_text()), age.load_identities(identity_file))


def error_lines(stderr: str) -> list[str]:
    """The operator-facing lines (not JSON log records)."""
    return [line for line in stderr.splitlines() if not line.startswith("{")]


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, tables: dict[str, dict[str, object]]) -> Path:
    """Write a TOML file from ``{"table.name": {key: value}}``."""
    lines = []
    for table, keys in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path

