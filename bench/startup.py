"""Start-up benchmark: how long backupd's commands take before they do their work.

Run as root from the repository (it needs the shared PostgreSQL on 127.0.0.1:5432, trust, which it
only reads: a logical dump of the small `postgres` database):

    .venv/bin/python bench/startup.py [--runs 21] [--only python,list,backup,wal-push]

Prints medians (and min/max) of:
  backup    `backupd backup JOB` (logical, PostgreSQL): from the command's start until `pg_dump` starts
            (a probe wraps backupd.tool.Tool and exits the command at that moment)
  list      `backupd list`: the whole command, five jobs (one per driver), an empty repository
  wal-push  `backupd wal-push PATH` to a running `backupd run` (the same segment every call: after the
            first, the daemon answers at once that it is durable): the whole command       goal <= 30 ms
  python    `python -c pass`: the floor every command pays
Every run is a fresh process, as PostgreSQL and an operator start them. Nothing is cached between
runs except the page cache; backupd is byte-compiled first, as pip does on install.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv" / "bin" / "python")
BACKUPD = [PYTHON, "-m", "backupd"]
SEGMENT = "000000010000000000000001"

CONFIG = """
[daemon]
state_dir = "{work}/state"
metrics_listen = "127.0.0.1:{port}"

[encryption]
recipients = ["{recipient}"]

[storage.main]
type = "filesystem"
path = "{work}/repo"

[jobs.pg]
driver = "postgres"
storage = "main"
dsn = "postgresql://postgres@127.0.0.1:5432/postgres"

[jobs.wal]
driver = "postgres"
storage = "main"
dsn = "postgresql://postgres@127.0.0.1:5432/postgres"
archive_logs = true
data_dir = "{work}/data"

[jobs.my]
driver = "mysql"
storage = "main"
dsn = "mysql://root@127.0.0.1:3306"

[jobs.mg]
driver = "mongodb"
storage = "main"
dsn = "mongodb://127.0.0.1:27017"

[jobs.sq]
driver = "sqlite"
storage = "main"
path = "{work}/x.db"
"""

#: Runs backupd's own main() with backupd.tool.Tool wrapped: at pg_dump's start, print the time and exit.
PROBE = """
import os, sys, time
import backupd.tool as tool
real = tool.Tool.__init__
def started(self, argv, *args, **kwargs):
    if os.path.basename(str(argv[0])) == "pg_dump" and "--version" not in argv:
        print(f"TOOL-START {time.time()}", flush=True)
        os._exit(0)
    real(self, argv, *args, **kwargs)
tool.Tool.__init__ = started
from backupd.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def to_tool_start(config: Path) -> float:
    start = time.time()
    out = subprocess.run([PYTHON, "-c", PROBE, "--config", str(config), "--log-level", "error", "backup", "pg"],
                         capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("TOOL-START "):
            return float(line.split()[1]) - start
    raise SystemExit(f"pg_dump never started (exit {out.returncode}):\n{out.stderr[-2000:]}")


def report(name: str, seconds: list[float], goal: str = "") -> None:
    ms = [s * 1000 for s in seconds]
    print(f"{name:<10} median {statistics.median(ms):7.1f} ms   min {min(ms):7.1f}   max {max(ms):7.1f}   "
          f"({len(ms)} runs) {goal}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_daemon(config: Path, work: Path) -> subprocess.Popen:
    log = open(work / "daemon.log", "wb")
    daemon = subprocess.Popen([*BACKUPD, "--config", str(config), "--log-format", "json", "run"], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    socket_path = work / "state" / "control.sock"
    deadline = time.monotonic() + 60
    while not socket_path.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"backupd run did not start:\n{(work / 'daemon.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return daemon


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--only", default="python,list,backup,wal-push",
                        help="comma-separated measurements (e.g. --only wal-push --runs 101)")
    args = parser.parse_args()
    runs, only = args.runs, set(args.only.split(","))
    subprocess.run([PYTHON, "-m", "compileall", "-q", "backupd", "drivers", "storage"], cwd=REPO, check=True)
    sys.path.insert(0, str(REPO))
    from backupd import age

    work = Path(tempfile.mkdtemp(prefix="backupd-startup-", dir="/tmp"))  # short: a unix socket lives in it
    daemon = None
    try:
        (work / "data" / "pg_wal" / "archive_status").mkdir(parents=True)
        (work / "data" / "pg_wal" / SEGMENT).write_bytes(os.urandom(1 << 16) * 256)  # 16 MiB
        for name in ("state", "repo"):
            (work / name).mkdir()
        config = work / "backupd.toml"
        config.write_text(CONFIG.format(work=work, port=free_port(),
                                        recipient=age.X25519Identity.generate().to_recipient()))
        if "python" in only:
            report("python", [timed([PYTHON, "-c", "pass"]) for _ in range(runs)])
        if "list" in only:
            report("list", [timed([*BACKUPD, "--config", str(config), "list"]) for _ in range(runs)])
        if "backup" in only:
            report("backup", [to_tool_start(config) for _ in range(runs)], "(until pg_dump starts)")
        if "wal-push" not in only:
            return 0
        daemon = start_daemon(config, work)
        push = [*BACKUPD, "--config", str(config), "wal-push", "--job", "wal", str(work / "data" / "pg_wal" / SEGMENT)]
        timed(push)  # the first push uploads the segment; the rest find it durable
        report("wal-push", [timed(push) for _ in range(runs)], "(daemon running; goal <= 30 ms)")
    finally:
        if daemon is not None:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
