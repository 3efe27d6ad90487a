"""The operator-facing files: systemd unit, alert rules and their tests, dashboard, example config."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backupd import plugins
from backupd.metrics import REGISTRY
from backupd.settings import DaemonSettings, JobSettings, RetentionSettings, VerifySettings, load_settings
from support import REPO_ROOT, require_tool

CONFIG = REPO_ROOT / "config"
UNIT = REPO_ROOT / "systemd" / "backupd.service"


def analyze(unit: Path) -> subprocess.CompletedProcess:
    tool = require_tool("systemd-analyze")
    return subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)


def test_systemd_unit_verifies_cleanly(tmp_path: Path) -> None:
    # ExecStart must exist for verify to pass: point a copy at this checkout's venv.
    backupd = Path(sys.executable).parent / "backupd"
    assert backupd.exists(), f"{backupd} missing: install the package into the venv"
    text = UNIT.read_text()
    assert "ExecStart=/opt/backupd/venv/bin/backupd --log-format json run" in text
    copy = tmp_path / "backupd.service"
    copy.write_text(text.replace("/opt/backupd/venv/bin/backupd", str(backupd)))
    result = analyze(copy)
    assert result.returncode == 0 and result.stderr == "", result.stderr

    # The check is not blind: a bad key shows up on stderr (systemd-analyze still exits 0).
    broken = tmp_path / "broken.service"
    broken.write_text(copy.read_text().replace("[Service]\n", "[Service]\nProtectSystm=strict\n"))
    assert "ProtectSystm" in analyze(broken).stderr


def test_systemd_unit_has_the_required_settings() -> None:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), value.strip())
    expected = {
        "Type": "notify", "Restart": "on-failure", "User": "backupd", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "ReadWritePaths": "/var/lib/backupd", "PrivateTmp": "yes",
        "ProtectHome": "yes", "CapabilityBoundingSet": "", "SystemCallFilter": "@system-service",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "KillMode": "mixed",
    }
    assert {key: settings.get(key) for key in expected} == expected
    assert "WatchdogSec" in settings and "ExecReload" in settings


def unit_values(key: str) -> list[str]:
    return [line.partition("=")[2].strip() for line in UNIT.read_text().splitlines()
            if line.partition("=")[0].strip() == key and not line.startswith("#")]


def test_systemd_unit_lets_the_verification_sandbox_run() -> None:
    """bwrap (unprivileged) creates namespaces and mounts in them, and mounts its own /proc."""
    namespaces = set(" ".join(unit_values("RestrictNamespaces")).split())
    assert {"user", "mnt", "pid", "net", "ipc"} <= namespaces, namespaces
    assert "@mount" in unit_values("SystemCallFilter") and "@system-service" in unit_values("SystemCallFilter")
    # Mounts over /proc/sys and /proc/kmsg make the kernel refuse a new proc mount in a user namespace.
    for key in ("ProtectKernelTunables", "ProtectKernelLogs", "ProtectProc", "ProcSubset"):
        assert unit_values(key) in ([], ["no"], ["default"], ["all"]), f"{key} breaks bwrap's --proc"
    assert unit_values("UMask") == ["0077"] and unit_values("StateDirectoryMode") == ["0700"]
    # the rest of the hardening stays
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices", "RestrictSUIDSGID"):
        assert unit_values(key) == ["yes"], key


def test_alert_rules_check_and_unit_tests_pass() -> None:
    promtool = require_tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(CONFIG / "alerts.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=CONFIG,
                          capture_output=True, text=True, timeout=120)
    assert test.returncode == 0, test.stdout + test.stderr


def test_shipped_scrape_config_is_valid_and_keeps_backupds_job_label() -> None:
    import yaml

    promtool = require_tool("promtool")
    check = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=CONFIG,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    config = yaml.safe_load((CONFIG / "prometheus.yml").read_text())
    [scrape] = config["scrape_configs"]
    assert scrape["honor_labels"] is True and config["rule_files"] == ["alerts.yml"]
    rules = (CONFIG / "alerts.yml").read_text()
    # The rules name the scrape job only where the series carries no backupd job label.
    assert set(re.findall(r'job="([^"]+)"', rules)) == {scrape["job_name"]}
    assert "job_id" not in rules and "exported_job" not in rules
    readme = (REPO_ROOT / "README.md").read_text()
    assert "config/prometheus.yml" in readme and "honor_labels: true" in readme


def _metric_names() -> set[str]:
    names = set()
    for collector in list(REGISTRY._collector_to_names):  # noqa: SLF001 (every registered metric)
        for metric in collector.describe():
            names.add(metric.name)
            if metric.type == "counter":
                names.add(metric.name + "_total")
    return names


def test_rules_and_dashboard_use_only_real_metric_names() -> None:
    import backupd.daemon.metrics  # noqa: F401 (registers the daemon's metrics)

    known = _metric_names() | {"up"}
    rules = (CONFIG / "alerts.yml").read_text()
    dashboard = json.loads((CONFIG / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set(re.findall(r"\b(backupd_[a-z_]+|up)\b", rules + "\n".join(exprs)))
    assert used and used <= known, used - known
    rule_names = re.findall(r"alert: (\w+)", rules)
    tested = set(re.findall(r"alertname: (\w+)", (CONFIG / "alerts_test.yml").read_text()))
    assert set(rule_names) == tested, "every alert rule has a promtool unit test"


def test_example_config_is_valid_and_shows_every_key() -> None:
    settings = load_settings(CONFIG / "backupd.example.toml")
    assert {job.driver for job in settings.jobs.values()} == {"postgres", "mysql", "mongodb", "redis", "sqlite"}
    assert {options["type"] for options in settings.storage.values()} == {"s3", "filesystem"}
    text = (CONFIG / "backupd.example.toml").read_text()
    shown = set(re.findall(r"^\s*([a-z_]+)\s*=", text, re.M)) | set(re.findall(r"[{,]\s*([a-z_]+)\s*=", text))
    keys = set(DaemonSettings.model_fields) | set(JobSettings.model_fields) | set(RetentionSettings.model_fields) \
        | set(VerifySettings.model_fields) | {"recipients", "identity_file"}
    for name in ("postgres", "mysql", "mongodb", "redis", "sqlite"):
        keys |= set(plugins.driver_class(name).options_model.model_fields)
    for name in ("s3", "filesystem"):
        keys |= set(plugins.storage_class(name).options_model.model_fields)
    assert keys - shown == set(), "keys missing from config/backupd.example.toml"
    assert settings.signing.key_file is not None and settings.signing.public_keys(), "the example signs by default"


@pytest.mark.parametrize("tool, package", [("promtool", "prometheus"), ("systemd-analyze", "systemd"),
                                           ("prlimit", "util-linux"), ("choom", "util-linux")])
def test_install_tools_knows_the_packages(tool: str, package: str) -> None:
    assert f"[{tool}]={package}" in (REPO_ROOT / "scripts" / "install-tools.sh").read_text()
