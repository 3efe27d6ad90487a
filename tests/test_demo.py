"""`make demo` runs end to end, and the commands it suggests work afterwards with only its
configuration: reading the repository (list, show, verify --integrity-only, prune --dry-run)
needs no encryption.recipients; backing up says which key is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from support import REPO_ROOT


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_demo_and_the_commands_it_suggests(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "config").mkdir()
    shutil.copy(REPO_ROOT / "scripts" / "demo.sh", tmp_path / "scripts")
    shutil.copy(REPO_ROOT / "config" / "quickstart.toml", tmp_path / "config")
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")}
    demo = run(["bash", "scripts/demo.sh"], tmp_path, env)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    hint = demo.stdout[demo.stdout.index("Carry on from this directory"):]
    assert "  export BACKUPD_CONFIG=config/quickstart.toml" in hint.splitlines()
    commands = [line.split() for line in hint.splitlines() if line.startswith("  .venv/bin/backupd ")]
    assert [c[1] for c in commands] == ["list", "show", "verify", "prune", "backup"]

    env["BACKUPD_CONFIG"] = "config/quickstart.toml"  # as the hint says; no recipients in the environment
    for command in commands[:4]:
        result = run(command, tmp_path, env)
        assert result.returncode == 0, f"{command}: {result.stderr}"
        assert result.stdout.strip(), command
    listed = run([".venv/bin/backupd", "list"], tmp_path, env)
    assert re.search(r"^\d{8}T\d{6}Z\s+demo\s", listed.stdout, re.MULTILINE), listed.stdout

    refused = run(commands[4], tmp_path, env)
    assert refused.returncode == 2
    assert "backupd: error: encryption.recipients is empty: writing a backup or an archived log encrypts to it" \
        in refused.stderr

    recipient = re.search(r"BACKUPD_ENCRYPTION__RECIPIENTS='(\[.*\])'", hint)
    assert recipient is not None
    env["BACKUPD_ENCRYPTION__RECIPIENTS"] = recipient.group(1)
    backed_up = run(commands[4], tmp_path, env)
    assert backed_up.returncode == 0, backed_up.stderr

    # The demo signs by default: with the trusted key the hint gives, every backup is signed by it.
    assert list((tmp_path / "var" / "repository" / "demo" / "backups").glob("*/manifest.json.sig"))
    signer = re.search(r"BACKUPD_SIGNING__TRUSTED_KEYS='(\[.*\])'", hint)
    assert signer is not None
    env["BACKUPD_SIGNING__TRUSTED_KEYS"] = signer.group(1)
    listed = run([".venv/bin/backupd", "list", "demo", "--json"], tmp_path, env)
    backups = json.loads(listed.stdout)["backups"]
    assert len(backups) == 2 and all(b["signature"].startswith("signed-by backupd@") for b in backups), backups
    if shutil.which("ssh-keygen"):
        assert 'Good "backupd" signature' in demo.stdout + demo.stderr
