"""The package builds without setuptools warnings about its metadata; the unit documents backupd itself."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from support import REPO_ROOT


def test_the_wheel_builds_without_a_license_deprecation_warning(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path), str(REPO_ROOT)],
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "project.license` as a TOML table is deprecated" not in output
    assert "BuildBackendWarning" not in output, output[-3000:]
    (wheel,) = tmp_path.glob("backupd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()


def test_the_unit_documentation_is_backupds_readme() -> None:
    unit = (REPO_ROOT / "systemd" / "backupd.service").read_text()
    docs = [line.partition("=")[2] for line in unit.splitlines() if line.startswith("Documentation=")]
    assert docs == ["file:///opt/backupd/README.md"]
