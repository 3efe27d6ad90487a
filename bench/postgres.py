"""PostgreSQL benchmark: backupd against pg_dump and pgBackRest on one throwaway cluster.

Run as root (PostgreSQL, backupd and pgbackrest run as the postgres OS user through runuser):

    .venv/bin/python bench/postgres.py [--scale 50] [--wal-gib 1] [--repeat 3] [--keep] [--skip-pgbackrest]
                                          [--cpu-priority low|idle|normal] [--types]

--types measures backup types instead (bench/pg_types.py): full, diff and incr after a 1% change, chain
restore and delta restore, against pgBackRest at the same process-max.

One cluster (initdb under /var/tmp, a free port, wal_level=replica, archive_mode=on) gets a
pgbench database, then:
  logical   backupd backup (logical)                  / pg_dump -Fc -f FILE             goal <= 1.1
            (no daemon: the command's own Python start-up is part of the time)
  WAL       --wal-gib of WAL from a pgbench load (1,000-row UPDATEs), archived through
            `backupd wal-push %p` (once without a daemon, then with `backupd run` pushing ahead)
            and through `pgbackrest archive-push %p` (archive-async=y): seconds from the start
            of the load until pg_stat_archiver has archived the last segment             goal <= 1.0
  physical  backupd backup --method physical          / pgbackrest backup --type=full  goal <= 1.0
            (compress-type=zst, level 3, process-max=2, local repo); each tool takes one
            before each of its WAL phases
  restore   backupd restore --to DIR + start + recovery to the end of the archive
            / pgbackrest restore + the same                                             goal <= 1.0
            (each replays the WAL phase after its tool's newest backup)
Every measurement runs --repeat times, alternating the two tools, and the table shows medians:
on a small shared machine one run of either is noise. Autovacuum is off: after each load the
bench runs VACUUM and CHECKPOINT itself, and before every timed step it syncs and waits until
the CPUs are idle, so no tool pays for the previous step's maintenance or writeback. backupd is byte-compiled first, as pip
does on install. Every cluster is stopped and the work directory removed on success and
failure (unless --keep).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from backupd import age  # noqa: E402
from drivers.postgres.cluster import Cluster, chown_tree, free_port, unsandboxed  # noqa: E402
from machine import wait_idle  # noqa: E402  (bench/, the script's directory)
from pg_types import TypesBench  # noqa: E402

PG_BIN = Path("/usr/lib/postgresql/15/bin")
BACKUPD = REPO / ".venv" / "bin" / "backupd"
JOB = "bench"
STANZA = "bench"


def fail(message: str) -> "SystemExit":
    return SystemExit(f"bench/postgres.py: {message}")


def as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv]


def run(argv: list[str], what: str, timeout: float = 3600) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/tmp")
    if proc.returncode != 0:
        raise fail(f"{what} exited {proc.returncode}:\n{(proc.stderr or proc.stdout)[-3000:]}")
    return proc.stdout


def timed(argv: list[str], what: str) -> float:
    started = time.monotonic()
    run(argv, what)
    return time.monotonic() - started


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="backupd-bench-pg-", dir=args.workdir))
        os.chmod(self.work, 0o755)
        self.primary = Cluster(self.work / "primary", PG_BIN, unsandboxed(self.work / "primary"))
        self.clusters: list[Cluster] = [self.primary]
        self.daemon: subprocess.Popen | None = None
        self.config = self.work / "backupd.toml"
        self.pgbr_config = self.work / "pgbackrest.conf"
        self.rows: list[tuple[str, str, list[float], str, list[float], str]] = []
        self.notes: list[str] = []

    # -- set-up ------------------------------------------------------------------------------
    def setup(self) -> None:
        identity = age.X25519Identity.generate()
        key = self.work / "identity.txt"
        key.write_text(f"{identity}\n")
        key.chmod(0o600)
        port = self.primary.port
        self.config.write_text(f"""
[daemon]
state_dir = "{self.work / 'state'}"
metrics_listen = "127.0.0.1:{free_port()}"

[storage.main]
type = "filesystem"
path = "{self.work / 'repo'}"

[encryption]
recipients = ["{identity.to_recipient()}"]
identity_file = "{key}"

[jobs.{JOB}]
driver = "postgres"
dsn = "postgresql://postgres@127.0.0.1:{port}/bench"
storage = "main"
method = "logical"
archive_logs = true
data_dir = "{self.primary.data}"
os_user = "postgres"
""" + (f'cpu_priority = "{self.args.cpu_priority}"\n' if self.args.cpu_priority else ""))
        self.pgbr_config.write_text(f"""[global]
repo1-path={self.work / 'pgbr-repo'}
repo1-retention-full=10
compress-type=zst
compress-level=3
process-max=2
start-fast=y
archive-async=y
spool-path={self.work / 'pgbr-spool'}
lock-path={self.work / 'pgbr-lock'}
log-path={self.work / 'pgbr-log'}
log-level-console=warn
log-level-file=info

[{STANZA}]
pg1-path={self.primary.data}
pg1-port={port}
pg1-socket-path={self.primary.socket_dir}
""")
        for sub in ("state", "repo", "pgbr-repo", "pgbr-spool", "pgbr-lock", "pgbr-log", "dumps"):
            (self.work / sub).mkdir()
        chown_tree(self.work, "postgres")
        self.primary.init({
            "wal_level": "replica", "archive_mode": True, "archive_command": "/bin/true",
            "max_wal_senders": 5, "max_wal_size": "4GB", "synchronous_commit": False,
            "shared_buffers": "256MB", "checkpoint_timeout": "15min",
            "autovacuum": False,  # VACUUM runs in quiet(), between the timed steps, not during one
        })
        self.primary.start()
        with self.primary.connect() as conn:
            conn.execute("CREATE DATABASE bench")
        started = time.monotonic()
        run(["pgbench", "-i", "-s", str(self.args.scale), "-q", "-h", str(self.primary.socket_dir), "-p", str(port),
             "-U", "postgres", "bench"], "pgbench -i", timeout=3600)
        with self.primary.connect("bench") as conn:
            size = conn.execute("SELECT pg_database_size('bench')").fetchone()[0]
        print(f"pgbench scale {self.args.scale}: database {size / 2**20:.0f} MiB, "
              f"loaded in {time.monotonic() - started:.0f} s; work dir {self.work}", flush=True)

    # -- helpers -----------------------------------------------------------------------------
    def backupd(self, *args: str) -> list[str]:
        return as_postgres([str(BACKUPD), "--config", str(self.config), "--log-format", "json", *args])

    def pgbackrest(self, *args: str) -> list[str]:
        return as_postgres(["pgbackrest", f"--config={self.pgbr_config}", f"--stanza={STANZA}", *args])

    def archive_command(self, command: str) -> None:
        """Wait for the archiver to catch up, then switch archive_command (ALTER SYSTEM + reload)."""
        self.wait_archived()
        with self.primary.connect() as conn:
            conn.execute("ALTER SYSTEM SET archive_command = %s" % literal(command))
            conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 10
            while conn.execute("SHOW archive_command").fetchone()[0] != command:
                if time.monotonic() > deadline:
                    raise fail("archive_command did not change after pg_reload_conf()")
                time.sleep(0.05)

    def wait_archived(self, timeout: float = 1800) -> str:
        """Close the current segment; wait until pg_stat_archiver reports it archived."""
        with self.primary.connect() as conn:
            conn.execute("SELECT txid_current()")
            segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
            deadline = time.monotonic() + timeout
            while True:
                last = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]
                if last and last[:8] == segment[:8] and last[:24] >= segment:
                    return segment
                if time.monotonic() > deadline:
                    raise fail(f"{segment} not archived within {timeout:.0f} s; server log: "
                               f"{self.primary.log_tail()}")
                time.sleep(0.05)

    def quiet(self, vacuum: bool = False) -> None:
        """Before a timed step: no maintenance left from the previous one, its writes on disk, CPUs idle.

        ``vacuum``: after a load, VACUUM and CHECKPOINT, and wait until that WAL is archived (by
        the tool whose phase it was); then for every step, sync and wait until the machine is idle."""
        if vacuum:
            with self.primary.connect("bench") as conn:
                conn.execute("VACUUM")
                conn.execute("CHECKPOINT")
            self.wait_archived()
        wait_idle()

    def failed_count(self) -> int:
        with self.primary.connect() as conn:
            return conn.execute("SELECT failed_count FROM pg_stat_archiver").fetchone()[0]

    def wal_phase(self) -> tuple[float, float, float]:
        """pgbench until --wal-gib of WAL is written, then wait until all of it is archived.

        Returns (total seconds, load seconds, GiB written)."""
        target = int(self.args.wal_gib * 2**30)
        with self.primary.connect() as conn:
            start_lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            started = time.monotonic()
            load = subprocess.Popen(["pgbench", "-n", "-f", str(self.load_script()), "-c", "4", "-j", "2",
                                     "-T", "3600", "-h",
                                     str(self.primary.socket_dir), "-p", str(self.primary.port), "-U", "postgres",
                                     "bench"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/tmp")
            try:
                while True:
                    written = conn.execute("SELECT pg_current_wal_insert_lsn() - %s::pg_lsn", (str(start_lsn),)
                                           ).fetchone()[0]
                    if written >= target:
                        break
                    if load.poll() is not None:
                        raise fail(f"pgbench stopped early (status {load.returncode})")
                    time.sleep(0.05)
            finally:
                load.kill()  # SIGKILL: a background job may ignore SIGINT, and SIGTERM waits for nothing better
                load.wait()
            loaded = time.monotonic() - started
            # Server backends finish the statements in flight: measure what was really written.
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pgbench'")
            time.sleep(0.2)
            written = conn.execute("SELECT pg_current_wal_insert_lsn() - %s::pg_lsn", (str(start_lsn),)).fetchone()[0]
        self.wait_archived()
        return time.monotonic() - started, loaded, float(written) / 2**30

    def load_script(self) -> Path:
        """A WAL-heavy pgbench script: each transaction updates 1,000 consecutive accounts."""
        path = self.work / "load.sql"
        last = 100_000 * self.args.scale - 1000
        path.write_text(f"\\set aid random(1, {last})\n"
                        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN :aid AND :aid + 999;\n")
        return path

    def start_daemon(self) -> None:
        log = open(self.work / "daemon.log", "wb")
        self.daemon = subprocess.Popen(self.backupd("run"), stdout=log, stderr=subprocess.STDOUT, cwd="/tmp",
                                       start_new_session=True)
        sock = self.work / "state" / "control.sock"
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise fail(f"backupd run did not start: {(self.work / 'daemon.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def daemon_cpu(self) -> float:
        """CPU seconds used so far by the daemon (the child runuser started) and its threads."""
        assert self.daemon is not None
        total = 0.0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == self.daemon.pid or int(entry.name) == self.daemon.pid:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop_daemon(self) -> None:
        if self.daemon is None or self.daemon.poll() is not None:
            self.daemon = None
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.daemon.pid, signal.SIGTERM)
        try:
            self.daemon.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.daemon.pid, signal.SIGKILL)
            self.daemon.wait()
        self.daemon = None

    def restore_and_recover(self, name: str, restore: Callable[[Cluster], list[str]], prepare: bool = False) -> float:
        """Run the restore command into a new data dir, start it, wait until recovery has ended."""
        cluster = Cluster(self.work / name, PG_BIN, unsandboxed(self.work / name))
        self.clusters.append(cluster)
        self.quiet()
        started = time.monotonic()
        if prepare:  # pgbackrest wants the directory to exist
            cluster.data.mkdir(parents=True)
            chown_tree(cluster.root, "postgres")
            cluster.data.chmod(0o700)
        run(restore(cluster), f"{name} restore")
        files = time.monotonic() - started
        cluster.prepare_root()
        cluster.configure({"archive_mode": False, "shared_buffers": "256MB"})
        cluster.start(timeout=3600)
        cluster.wait_promoted(timeout=3600)
        elapsed = time.monotonic() - started
        cluster.close()
        if not self.args.keep:  # a restored cluster is GBs: keep the peak disk use down
            shutil.rmtree(cluster.root, ignore_errors=True)
        self.notes.append(f"{name}: restore command {files:.1f} s, start + recovery {elapsed - files:.1f} s")
        return elapsed

    # -- the measurements --------------------------------------------------------------------
    def measure(self) -> None:
        """Each pair of measurements alternates backupd and the native tool, --repeat times; medians count."""
        skip = self.args.skip_pgbackrest
        reps = self.args.repeat
        dump = self.work / "dumps" / "bench.dump"
        pg_dump = as_postgres([str(PG_BIN / "pg_dump"), "-Fc", "-f", str(dump), "-h", str(self.primary.socket_dir),
                               "-p", str(self.primary.port), "-U", "postgres", "bench"])
        self.quiet(vacuum=True)
        logical, native_logical = self.alternate(self.backupd("backup", JOB), pg_dump, "logical")
        self.rows.append(("logical", "backupd backup", logical, "pg_dump -Fc -f", native_logical, "<= 1.1"))
        self.notes.append(f"pg_dump -Fc file {dump.stat().st_size / 2**20:.0f} MiB; backupd logical stored "
                          f"{tree_size(self.work / 'repo' / JOB / 'backups') / 2**20 / reps:.0f} MiB")

        backupd_push = f"{BACKUPD} --config {self.config} wal-push %p"
        pgbr_push = f"pgbackrest --config={self.pgbr_config} --stanza={STANZA} archive-push %p"
        self.archive_command(backupd_push)
        self.quiet()
        wal_plain, load_plain, gib = self.wal_phase()
        self.quiet(vacuum=True)
        print(f"WAL (wal-push, no daemon): {gib:.2f} GiB archived {wal_plain:.1f} s after the load started "
              f"(load {load_plain:.1f} s)", flush=True)
        if not skip:
            self.archive_command(pgbr_push)
            run(self.pgbackrest("stanza-create"), "pgbackrest stanza-create")
            run(self.pgbackrest("check"), "pgbackrest check")
        physical: list[float] = []
        native_physical: list[float] = []
        wal: list[float] = []
        native_wal: list[float] = []
        loads: dict[str, list[float]] = {"daemon": [], "pgbackrest": []}
        daemon_cpu: list[float] = []
        failures = 0
        for _ in range(reps):  # each tool: a full backup, then a WAL phase its restore will replay
            self.archive_command(backupd_push)
            failed = self.failed_count()
            self.quiet()
            physical.append(timed(self.backupd("backup", JOB, "--method", "physical"), "backupd backup --method physical"))
            self.start_daemon()
            try:
                self.quiet()
                cpu_before = self.daemon_cpu()
                seconds, load, gib_d = self.wal_phase()
                daemon_cpu.append(self.daemon_cpu() - cpu_before)
                self.quiet(vacuum=True)
            finally:
                self.stop_daemon()
            wal.append(seconds)
            loads["daemon"].append(load)
            failures += self.failed_count() - failed
            print(f"physical: backupd {physical[-1]:.1f} s; WAL (wal-push, daemon): {gib_d:.2f} GiB archived "
                  f"{seconds:.1f} s after the load started (load {load:.1f} s)", flush=True)
            if skip:
                continue
            self.archive_command(pgbr_push)
            self.quiet()
            native_physical.append(timed(self.pgbackrest("backup", "--type=full"), "pgbackrest backup --type=full"))
            self.quiet()
            seconds, load, gib_p = self.wal_phase()
            self.quiet(vacuum=True)
            native_wal.append(seconds)
            loads["pgbackrest"].append(load)
            print(f"physical: pgbackrest {native_physical[-1]:.1f} s; WAL (archive-push async): {gib_p:.2f} GiB "
                  f"archived {seconds:.1f} s after the load started (load {load:.1f} s)", flush=True)
        if failures:
            self.notes.append(f"archive_command failures during the backupd WAL phases: {failures}")
        restore: list[float] = []
        native_restore: list[float] = []
        # Each replays the WAL of its tool's last phase. The very first restore after the loads pays for
        # the kernel's first touch of memory (twice the system time for the same files on this VM): the
        # tool that goes first alternates, and the medians leave that one run out.
        for attempt in range(reps):
            steps = [("backupd", restore, lambda a=attempt: self.restore_and_recover(
                f"restored-backupd-{a}", self.backupd_restore_argv))]
            if not skip:
                steps.append(("pgbackrest", native_restore, lambda a=attempt: self.restore_and_recover(
                    f"restored-pgbackrest-{a}", lambda c: self.pgbackrest(f"--pg1-path={c.data}", "restore"),
                    prepare=True)))
            for tool, times, step in steps if attempt % 2 == 0 else reversed(steps):
                times.append(step())
                print(f"restore: {tool} {times[-1]:.1f} s", flush=True)
        self.rows += [
            ("physical", "backupd backup --method physical", physical, "pgbackrest backup --type=full",
             native_physical, "<= 1.0"),
            ("WAL", f"wal-push, no daemon ({gib:.2f} GiB)", [wal_plain], "archive-push async", native_wal, "<= 1.0"),
            ("WAL", "wal-push, daemon (1 GiB)", wal, "archive-push async (1 GiB)", native_wal, "<= 1.0"),
            ("restore", "backupd restore + recovery", restore, "pgbackrest restore + recovery", native_restore,
             "<= 1.0"),
        ]
        self.notes.append(f"CPU seconds of `backupd run` per WAL phase: {fmt(daemon_cpu)}")
        self.notes.append(f"WAL load alone (pgbench until {self.args.wal_gib} GiB written): no daemon "
                          f"{load_plain:.1f} s, daemon {fmt(loads['daemon'])} s, pgbackrest {fmt(loads['pgbackrest'])} s")
        self.notes.append(f"stored: backupd backups {tree_size(self.work / 'repo' / JOB / 'backups') / 2**20:.0f} MiB "
                          f"(logical and physical), pgbackrest {tree_size(self.work / 'pgbr-repo' / 'backup') / 2**20:.0f} "
                          "MiB (physical)")

    def alternate(self, ours: list[str], native: list[str], what: str) -> tuple[list[float], list[float]]:
        """--repeat timings of each, the native tool first, the machine settled before every one."""
        mine: list[float] = []
        theirs: list[float] = []
        for _ in range(self.args.repeat):
            self.quiet()
            theirs.append(timed(native, f"{what}: the native tool"))
            self.quiet()
            mine.append(timed(ours, f"{what}: backupd"))
        print(f"{what}: backupd {fmt(mine)} s, native {fmt(theirs)} s", flush=True)
        return mine, theirs

    def backupd_restore_argv(self, cluster: Cluster) -> list[str]:
        return self.backupd("restore", JOB, "--to", str(cluster.data))

    def report(self) -> None:
        print()
        print(f"PostgreSQL benchmark: pgbench scale {self.args.scale}, {self.args.wal_gib} GiB of WAL per phase, "
              f"medians of {self.args.repeat} alternating runs (one run of this script; indicative figures)")
        header = ("measure", "backupd", "s", "native", "s", "ratio", "goal")
        lines = [header]
        for measure, ours, mine, theirs, native, goal in self.rows:
            a, b = median(mine), median(native) if native else 0.0
            lines.append((measure, ours, f"{a:.1f}", theirs, f"{b:.1f}" if b else "-", f"{a / b:.2f}" if b else "-",
                          goal))
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        for row in lines:
            print("  ".join(cell.ljust(w) if i in (0, 1, 3, 6) else cell.rjust(w)
                            for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        for measure, ours, mine, theirs, native, _ in self.rows:
            print(f"  runs: {measure} {ours}: {fmt(mine)} s; {theirs}: {fmt(native) or '-'} s")
        for note in self.notes:
            print(f"  note: {note}")

    # -- clean-up ----------------------------------------------------------------------------
    def cleanup(self) -> None:
        self.stop_daemon()
        for cluster in reversed(self.clusters):
            with contextlib.suppress(Exception):
                cluster.close()
        kill_stragglers(str(self.work))
        if self.args.keep:
            print(f"kept {self.work}", file=sys.stderr)
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def fmt(values: list[float]) -> str:
    return " ".join(f"{v:.1f}" for v in values)


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def kill_stragglers(marker: str) -> None:
    """pgbackrest's async archive-push/-get processes outlive their parent for a while: end ours."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and "pgbackrest" in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGTERM)


def compile_sources() -> None:
    """Byte-compile backupd as pip does on install: PostgreSQL's user cannot write __pycache__ here,
    and PYTHONDONTWRITEBYTECODE may be set, so every call would compile its modules again."""
    run([sys.executable, "-m", "compileall", "-q", str(REPO / "backupd"), str(REPO / "drivers"), str(REPO / "storage")],
        "compileall")


def preflight(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise fail("run as root: PostgreSQL, backupd and pgbackrest run as the postgres user through runuser")
    if not (PG_BIN / "initdb").exists():
        raise fail(f"{PG_BIN}/initdb not found: install PostgreSQL 15 server binaries")
    if not BACKUPD.exists():
        raise fail(f"{BACKUPD} not found: run `make venv` (built from /usr/bin/python3 so postgres can run it)")
    if shutil.which("pgbench") is None:
        raise fail("pgbench not found (Debian: postgresql-client or postgresql-contrib)")
    if (args.types or not args.skip_pgbackrest) and shutil.which("pgbackrest") is None:
        raise fail("pgbackrest not found: `apt-get install pgbackrest` (Debian's 2.45), or pass --skip-pgbackrest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale factor (default 50, ~750 MiB)")
    parser.add_argument("--wal-gib", type=float, default=1.0, help="GiB of WAL per archiving phase (default 1)")
    parser.add_argument("--workdir", default="/var/tmp", help="where the clusters and repositories go")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs per measurement (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--skip-pgbackrest", action="store_true", help="measure backupd only")
    parser.add_argument("--types", action="store_true",
                        help="measure full/diff/incr, chain restore and delta restore against pgBackRest instead")
    parser.add_argument("--cpu-priority", choices=["low", "idle", "normal"],
                        help="the job's cpu_priority (default: backupd's own default)")
    args = parser.parse_args()
    preflight(args)
    compile_sources()
    bench = Bench(args)

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(f"bench/postgres.py: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        bench.setup()
        if args.types:
            types = TypesBench(bench, run, timed, PG_BIN, JOB, BACKUPD, STANZA)
            types.measure()
            types.report()
        else:
            bench.measure()
            bench.report()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.cleanup()


if __name__ == "__main__":
    main()
