"""Scratch servers are bounded in memory: hostile content fails inside them, never takes the host down.

Every process a Sandbox runs (bubblewrap or not) gets oom_score_adj 1000 and an
RLIMIT_DATA of ``verify.memory_limit`` (default half the host's memory); the
attack is a logical PostgreSQL backup whose restore allocates without end.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from backupd.errors import ConfigError
from backupd.sandbox import SandboxPolicy, SandboxUnavailable, host_memory_limit, limit_tools, unprivileged_user
from backupd.settings import load_settings
from backupd.sizes import GiB, MiB
from backupd.tool import run
from pg_fixtures import JOB, PgEnv, pg_env  # noqa: F401  (fixture)
from support import error_lines, require_tool, run_backupd, write_config
from test_postgres_hostile import attacker, latest_report, mallory  # noqa: F401  (fixture)

ARCHIVE_LOGS = False
METHOD = "logical"
PROBE = ["sh", "-c", "cat /proc/self/oom_score_adj; ulimit -d"]

#: A CHECK that is cheap for its owner and asks for 3 GB for anyone else, such as the role verification
#: restores as (it runs for each row COPY loads). Unbounded, the server grows the string to PostgreSQL's
#: 1 GB cap ("out of memory", "Cannot enlarge string buffer"); under the limit malloc refuses first.
HOG = """
CREATE FUNCTION mallory.hog(v int) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF current_user <> 'mallory' THEN
        PERFORM length(string_agg(repeat('x', 1000000), '')) FROM generate_series(1, 3000);
    END IF;
    RETURN true;
END $$
"""


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A scratch directory the scratch user can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="backupd-scratchmem-", dir="/tmp"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("mode", ["bwrap", "off"])
@pytest.mark.parametrize("as_user", [False, True], ids=["self", "scratch-user"])
def test_every_sandboxed_process_runs_bounded(scratch: Path, mode: str, as_user: bool) -> None:
    if mode == "bwrap":
        require_tool("bwrap")
    user = unprivileged_user(None) if as_user else None
    if as_user and user is None:
        pytest.skip("not root: processes run as ourselves")
    box = SandboxPolicy(mode, memory_limit=512 * MiB).for_scratch([scratch], user=user)
    assert run(PROBE, sandbox=box).split() == ["1000", str(512 * 1024)]  # ulimit -d: KiB
    # the limit holds: an allocation beyond it fails in the process, one below it succeeds
    grab = "import sys\ntry: bytearray(int(sys.argv[1]) << 20); print('got it')\nexcept MemoryError: print('refused')"
    assert run(["/usr/bin/python3", "-c", grab, "600"], sandbox=box).strip() == "refused"
    assert run(["/usr/bin/python3", "-c", grab, "200"], sandbox=box).strip() == "got it"


def test_the_default_limit_is_half_the_host_memory(scratch: Path) -> None:
    total = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    assert host_memory_limit() == total * 1024 // 2
    box = SandboxPolicy("off").for_scratch([scratch], user=None)
    assert run(PROBE, sandbox=box).split() == ["1000", str(total // 2)]


def test_missing_prlimit_is_a_clear_error(tmp_path: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no util-linux here
    limit_tools.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable) as info:
            SandboxPolicy("off").for_scratch([scratch], user=None)
        usable, detail = SandboxPolicy("off").describe()  # backupd check
    finally:
        limit_tools.cache_clear()
    assert str(info.value).startswith("prlimit: not found on PATH; ") and "\n" not in str(info.value)
    assert info.value.hint is not None and "util-linux" in info.value.hint
    assert not usable and detail == str(info.value)


def _config(tmp_path: Path, verify: dict[str, object]) -> Path:
    return write_config(tmp_path / "c.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.local": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "jobs.orders": {"driver": "sqlite", "path": str(tmp_path / "db.sqlite3"), "storage": "local",
                        "verify": verify},
    })


def test_memory_limit_setting(tmp_path: Path) -> None:
    assert load_settings(_config(tmp_path, {"memory_limit": "4GiB"})).jobs["orders"].verify.memory_limit == 4 * GiB
    assert load_settings(_config(tmp_path, {"memory_limit": "512M"})).jobs["orders"].verify.memory_limit == 512 * MiB
    assert load_settings(_config(tmp_path, {})).jobs["orders"].verify.memory_limit is None
    for bad, says in (("lots", "not a size: 'lots'"), ("1k", "greater than or equal to 67108864")):
        with pytest.raises(ConfigError) as info:
            load_settings(_config(tmp_path, {"memory_limit": bad}))
        assert any(line.startswith("jobs.orders.verify.memory_limit: ") and says in line
                   for line in info.value.errors), info.value.errors
    result = run_backupd("list", config=_config(tmp_path, {"memory_limit": "lots"}))
    assert result.code == 2
    lines = [line.strip() for line in error_lines(result.err)]
    assert any(line.startswith("jobs.orders.verify.memory_limit: not a size: 'lots'") for line in lines), result.err


def with_memory_limit(env: PgEnv, limit: str) -> PgEnv:
    text = env.config.read_text()
    assert "checks = [" in text
    config = env.root / "backupd-memory.toml"
    config.write_text(text.replace("checks = [", f'memory_limit = "{limit}", checks = [', 1))
    shutil.chown(config, "postgres", "postgres")
    return dataclasses.replace(env, config=config)


def test_a_restore_that_allocates_without_end_fails_verification(attacker: PgEnv) -> None:  # noqa: F811
    env = with_memory_limit(attacker, "512MiB")
    with mallory(env) as conn:
        conn.execute(HOG)
        conn.execute("CREATE TABLE mallory.hog (id int CHECK (mallory.hog(id)))")
        conn.execute("INSERT INTO mallory.hog VALUES (1)")
    try:
        hostile = env.backupd("backup", JOB, check=True).out.strip()
        result = env.backupd("verify", JOB, "--backup", hostile, as_postgres=False, timeout=300)
    finally:
        with mallory(env) as conn:
            conn.execute("DROP TABLE mallory.hog")
    assert result.code == 3, result.out + result.err
    lines = result.out.splitlines()
    at = lines.index(f"{hostile}  full  BAD")
    assert "the dump does not restore" in lines[at + 1] and "ERROR:  out of memory" in lines[at + 1], result.out
    report = latest_report(env)
    assert report["backup_id"] == hostile and report["result"] == "failed"
    problem = " ".join(report["problems"])
    assert "out of memory" in problem and "Failed on request of size" in problem, problem  # malloc refused
    assert env.sql("SELECT 1") == [(1,)]  # production still answers

    good = env.backupd("backup", JOB, check=True).out.strip()
    again = env.backupd("verify", JOB, "--backup", good, as_postgres=False, timeout=300)
    assert again.code == 0, again.out + again.err
    assert latest_report(env)["result"] == "passed"



def test_a_lower_hard_limit_backupd_runs_under_is_kept() -> None:
    """Under a unit's LimitDATA= the scratch user cannot raise the hard limit: prlimit would fail to start it."""
    import resource
    import subprocess

    from backupd.sandbox import bounds_argv

    hard = 300 << 20

    def lowered() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))

    argv = [sys.executable, "-c", "import sys; from backupd.sandbox import bounds_argv; "
            "print(' '.join(bounds_argv(1 << 30)))"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, preexec_fn=lowered,
                         cwd=str(Path(__file__).resolve().parent.parent)).stdout
    assert f"--data={hard}:{hard}" in out
    if resource.getrlimit(resource.RLIMIT_DATA)[1] == resource.RLIM_INFINITY:
        assert f"--data={1 << 30}:{1 << 30}" in bounds_argv(1 << 30)
