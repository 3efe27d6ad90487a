"""MySQL/MariaDB benchmark: backupd against the native tools on a throwaway mariadbd.

Prints, for a database of --size-gib of InnoDB data:
  logical:  backupd backup / mariadb-dump --single-transaction > file        (goal <= 1.1)
            and / mariadb-dump | zstd -3 -T0 | age > file (the same work with the native tools)
  physical: backupd backup --method physical / mariadb-backup --stream | zstd > file   (goal <= 1.1)
  incr:     backupd backup --type incr / mariadb-backup --incremental-lsn | zstd > file, after 1% of the
            rows changed (time and bytes), and the chain's restore / a by-hand prepare  (goal <= 1.1)
  PITR restore: dump load seconds and binlog replay seconds

Run: .venv/bin/python bench/mysql.py --size-gib 2 [--workdir /var/tmp] [--repeat 3] [--cpu-priority P]
     [--only logical physical incr pitr]

After filling, the bench waits until the fill's writes are on disk and the machine is idle,
so neither side pays for them, and so does it before every timed step; with --repeat N each side runs N times, alternately, and the
median is compared.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backupd import age  # noqa: E402
from backupd.context import JobContext  # noqa: E402
from backupd.settings import load_settings  # noqa: E402
from backupd.sandbox import SandboxPolicy, unprivileged_user  # noqa: E402
from drivers.mysql.client import tool_path as find_tool  # noqa: E402
from drivers.mysql.scratch import MariadbScratch as ScratchServer, SandboxFor, install_db  # noqa: E402
from machine import wait_idle  # noqa: E402  (bench/, the script's directory)


SECTIONS = ("logical", "physical", "incr", "pitr")


def unsandboxed() -> SandboxFor:
    """The bench's own servers run as the mysql user (when root), without bubblewrap."""
    user = unprivileged_user(None, ("mysql",))
    return lambda dirs: SandboxPolicy("off").for_scratch(dirs, user=user)


def timed(func, *args) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    func(*args)
    return time.monotonic() - started


def run(argv: list[str], **kwargs) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run(argv, capture_output=True, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} exited {proc.returncode}: {proc.stderr.decode()[-2000:]}")


def backupd(config: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "backupd", "--config", str(config), "--log-format", "json", *args],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"backupd {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def settle(server: ScratchServer, timeout: float = 180) -> float:
    """Wait until the fill's writes are on disk and the CPUs are idle; return the seconds waited.

    Only this throwaway source server is touched: its dirty-page target drops to 0 meanwhile.
    """
    started = time.monotonic()
    os.sync()
    conn = server.credentials.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT @@innodb_max_dirty_pages_pct")
            saved = cur.fetchone()[0]
            cur.execute("SET GLOBAL innodb_max_dirty_pages_pct = 0")
            try:
                while time.monotonic() - started < timeout:
                    cur.execute("SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_pages_dirty'")
                    if int(cur.fetchone()[1]) < 100:
                        break
                    time.sleep(1)
            finally:
                cur.execute(f"SET GLOBAL innodb_max_dirty_pages_pct = {float(saved)}")
    finally:
        conn.close()
    wait_idle(max(1.0, timeout - (time.monotonic() - started)), sample=2.0)
    return time.monotonic() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


def samples(values: list[float]) -> str:
    return "" if len(values) < 2 else " [" + " ".join(f"{v:.1f}" for v in values) + "]"


def fill(server: ScratchServer, size: int) -> int:
    conn = server.credentials.connect()
    with conn.cursor() as cur:
        cur.execute("CREATE DATABASE bench")
        cur.execute("USE bench")
        cur.execute("CREATE TABLE events (id BIGINT PRIMARY KEY, account INT, kind VARCHAR(16), "
                    "amount DECIMAL(12,2), note VARCHAR(255), created DATETIME, KEY (account))")
        rows, batch = 0, 500_000
        while True:
            cur.execute("SELECT data_length + index_length FROM information_schema.tables "
                        "WHERE table_schema='bench' AND table_name='events'")
            if cur.fetchone()[0] >= size:
                break
            cur.execute(
                f"INSERT INTO events SELECT seq + {rows}, seq % 100000, ELT(1 + seq % 4, 'deposit', 'withdrawal', "
                f"'fee', 'refund'), (seq % 100000) / 100, CONCAT('order ', seq, ' ', md5(seq), ' ', "
                f"repeat(substr(md5(seq % 977), 1, 8), 1 + seq % 12)), "
                f"'2026-01-01' + INTERVAL (seq % 31536000) SECOND FROM seq_1_to_{batch}")
            rows += batch
            cur.execute("ANALYZE TABLE events")
    conn.close()
    return rows


def native_copy(defaults: Path, out_file: Path, lsn_dir: Path, base: Path, lsn: int | None = None) -> float:
    """``mariadb-backup --backup --stream [--incremental-lsn] | zstd -3 > file``; its checkpoints in ``lsn_dir``."""
    argv = [find_tool("backup"), f"--defaults-extra-file={defaults}", "--backup", "--stream=xbstream",
            f"--target-dir={base / 'xbtmp'}", f"--extra-lsndir={lsn_dir}"]
    if lsn is not None:
        argv.append(f"--incremental-lsn={lsn}")
    started = time.monotonic()
    with open(out_file, "wb") as out:
        backup = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        zstd = subprocess.Popen(["zstd", "-q", "-3"], stdin=backup.stdout, stdout=out)
        backup.stdout.close()
        assert zstd.wait() == 0 and backup.wait() == 0
    took = time.monotonic() - started
    shutil.rmtree(base / "xbtmp", ignore_errors=True)
    return took


def to_lsn(lsn_dir: Path) -> int:
    text = (lsn_dir / "xtrabackup_checkpoints").read_text()
    return int(re.search(r"^to_lsn = (\d+)", text, re.M)[1])  # type: ignore[index]


def native_chain_restore(files: list[Path], dest: Path) -> float:
    """By hand: unpack the full and each increment, prepare the full, apply each increment in order."""
    started = time.monotonic()
    dirs = []
    for index, path in enumerate(files):
        target = dest if index == 0 else dest.parent / f"{dest.name}-inc{index}"
        target.mkdir(parents=True)
        run(["sh", "-c", f'zstd -q -d -c "{path}" | {find_tool("stream")} -x -C "{target}"'])
        dirs.append(target)
    run([find_tool("backup"), "--no-defaults", "--prepare", f"--target-dir={dest}"])
    for increment in dirs[1:]:
        run([find_tool("backup"), "--no-defaults", "--prepare", f"--target-dir={dest}",
             f"--incremental-dir={increment}"])
    took = time.monotonic() - started
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)
    return took


def incremental(args: argparse.Namespace, base: Path, source: ScratchServer, config: Path, defaults: Path,
                rows: int) -> None:
    """A full, then --repeat rounds of (1% of the rows changed, an incr) on each side, then the chain restored.

    Each side keeps its own chain (the native one by --extra-lsndir and --incremental-lsn), and both see the
    same changes, the server settled before every copy.
    """
    conn = source.credentials.connect()
    conn.autocommit(True)
    native_files = [base / "native-full.xb.zst"]
    native_copy(defaults, native_files[0], base / "lsn", base)
    backupd(config, "backup", "chain")
    step = max(1, rows // 100)
    natives, ours, native_sizes, our_sizes = [], [], [], []
    notes: list[str] = []  # whether each incr recorded row counts (it never waits for them)
    ctx = JobContext(load_settings(config), "chain")
    for index in range(args.repeat):
        with conn.cursor() as cur:
            cur.execute(f"UPDATE bench.events SET amount = amount + 1 WHERE id > {index * step} "
                        f"AND id <= {(index + 1) * step}")
        settle(source, 60)
        native_files.append(base / f"native-incr{index + 1}.xb.zst")
        natives.append(native_copy(defaults, native_files[-1], base / "lsn", base, to_lsn(base / "lsn")))
        native_sizes.append(native_files[-1].stat().st_size)
        wait_idle()
        ours.append(timed(backupd, config, "backup", "chain", "--type", "incr"))
        newest = ctx.repository.resolve(None)
        our_sizes.append(newest.stored_size)
        notes.append("counted" if newest.row_counts else "not counted")
    conn.close()
    native_s, ours_s = median(natives), median(ours)
    print(f"incr (1% of rows changed): mariadb-backup --incremental-lsn | zstd {native_s:.1f}s{samples(natives)} "
          f"{median(native_sizes) / 2**20:.1f} MiB; backupd backup --type incr {ours_s:.1f}s{samples(ours)} "
          f"{median(our_sizes) / 2**20:.1f} MiB; ratio {ours_s / native_s:.2f} time, "
          f"{median(our_sizes) / median(native_sizes):.2f} bytes (goal <= 1.1); row counts: {', '.join(notes)}")
    newest = ctx.repository.resolve(None).backup_id
    ctx.close()
    wait_idle()
    native = native_chain_restore(native_files, base / "native-restore")
    shutil.rmtree(base / "native-restore", ignore_errors=True)
    wait_idle()
    ours_restore = timed(backupd, config, "restore", "chain", "--backup", newest, "--to", str(base / "chain-restore"))
    shutil.rmtree(base / "chain-restore", ignore_errors=True)
    print(f"chain restore (full + {args.repeat} incr): by hand (zstd -d | mbstream -x, --prepare, "
          f"--prepare --incremental-dir) {native:.1f}s; backupd restore {ours_restore:.1f}s; ratio "
          f"{ours_restore / native:.2f} (goal <= 1.1)")
    for path in native_files:
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=2.0, help="InnoDB data to generate (default 2)")
    parser.add_argument("--workdir", default="/tmp", help="where the servers, dumps and repository go")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side, alternating; medians compared")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these comparisons (default: all)")
    parser.add_argument("--cpu-priority", choices=["low", "idle", "normal"],
                        help="the job's cpu_priority (default: backupd's own default)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="backupd-bench-mysql-", dir=args.workdir))
    base.chmod(0o711)  # the servers run as mysql
    source = ScratchServer(base / "src-data", base / "src-run", unsandboxed(),
                           [f"--log-bin={base / 'src-data' / 'mysql-bin'}", "--server-id=1", "--binlog-format=ROW",
                            "--innodb-log-file-size=1G", "--max-binlog-size=256M"])
    restore_target = ScratchServer(base / "dst-data", base / "dst-run", unsandboxed(), ["--innodb-log-file-size=1G"])
    try:
        install_db(source.datadir, unsandboxed())
        source.start()
        started = time.monotonic()
        rows = fill(source, int(args.size_gib * 2**30))
        conn = source.credentials.connect()
        with conn.cursor() as cur:
            cur.execute("SELECT data_length + index_length FROM information_schema.tables WHERE table_schema='bench'")
            innodb = int(cur.fetchone()[0])
        conn.close()
        print(f"data: {rows} rows, {innodb / 2**30:.2f} GiB InnoDB (data+index), filled in {time.monotonic() - started:.0f}s"
              f", settled in {settle(source):.0f}s")

        identity = age.X25519Identity.generate()
        (base / "key.txt").write_text(f"{identity}\n")
        config = base / "backupd.toml"
        config.write_text(f"""
[daemon]
state_dir = "{base / 'state'}"
[storage.main]
type = "filesystem"
path = "{base / 'repo'}"
[encryption]
recipients = ["{identity.to_recipient()}"]
identity_file = "{base / 'key.txt'}"
[jobs.bench]
driver = "mysql"
dsn = "mysql://root@localhost/?socket={source.socket}"
storage = "main"
databases = ["bench"]
archive_logs = true
binlog_flush_interval = "5s"
""" + (f'cpu_priority = "{args.cpu_priority}"\n' if args.cpu_priority else "") + f"""
[jobs.chain]
driver = "mysql"
dsn = "mysql://root@localhost/?socket={source.socket}"
storage = "main"
databases = ["bench"]
method = "physical"
""" + (f'cpu_priority = "{args.cpu_priority}"\n' if args.cpu_priority else ""))
        defaults = base / "native.cnf"
        defaults.write_text(f"[client]\nuser=root\nsocket={source.socket}\n")
        defaults.chmod(0o600)

        native_dump_argv = [find_tool("dump"), f"--defaults-extra-file={defaults}", "--single-transaction",
                            "--master-data=2", "--routines", "--events", "--triggers", "--hex-blob", "--databases",
                            "bench"]

        def native_dump() -> tuple[float, int]:
            dump_file = base / "native.sql"
            started = time.monotonic()
            with open(dump_file, "wb") as out:
                proc = subprocess.run(native_dump_argv, stdout=out, stderr=subprocess.PIPE)
            took = time.monotonic() - started
            assert proc.returncode == 0, proc.stderr
            size = dump_file.stat().st_size
            dump_file.unlink()
            return took, size

        def native_pipeline() -> float:
            """The same work as backupd's with the native tools: dump | zstd -3 -T0 | age > file."""
            out_file = base / "native.sql.zst.age"
            started = time.monotonic()
            with open(out_file, "wb") as out:
                dump = subprocess.Popen(native_dump_argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                zstd = subprocess.Popen(["zstd", "-q", "-3", "-T0"], stdin=dump.stdout, stdout=subprocess.PIPE)
                dump.stdout.close()
                encrypt = subprocess.Popen(["age", "-r", str(identity.to_recipient())], stdin=zstd.stdout, stdout=out)
                zstd.stdout.close()
                assert encrypt.wait() == 0 and zstd.wait() == 0 and dump.wait() == 0
            took = time.monotonic() - started
            out_file.unlink()
            return took

        def native_physical() -> float:
            xb_file = base / "native.xb.zst"
            started = time.monotonic()
            with open(xb_file, "wb") as out:
                backup = subprocess.Popen([find_tool("backup"), f"--defaults-extra-file={defaults}", "--backup",
                                           "--stream=xbstream", f"--target-dir={base / 'xbtmp'}"],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                zstd = subprocess.Popen(["zstd", "-q", "-3"], stdin=backup.stdout, stdout=out)
                backup.stdout.close()
                assert zstd.wait() == 0 and backup.wait() == 0
            took = time.monotonic() - started
            xb_file.unlink()
            shutil.rmtree(base / "xbtmp", ignore_errors=True)
            return took

        if "logical" in args.only:
            natives, ours, pipelines = [], [], []
            for _ in range(args.repeat):
                wait_idle()
                took, dump_size = native_dump()
                natives.append(took)
                wait_idle()
                ours.append(timed(backupd, config, "backup", "bench"))
                if shutil.which("age"):
                    wait_idle()
                    pipelines.append(native_pipeline())
            native_logical, ours_logical = median(natives), median(ours)
            print(f"logical:  mariadb-dump > file {native_logical:.1f}s{samples(natives)} ({dump_size / 2**30:.2f} GiB); "
                  f"backupd backup {ours_logical:.1f}s{samples(ours)}; ratio {ours_logical / native_logical:.2f} "
                  f"(goal <= 1.1)")
            if pipelines:
                print(f"logical:  mariadb-dump | zstd -3 -T0 | age > file {median(pipelines):.1f}s{samples(pipelines)}; "
                      f"backupd / that {ours_logical / median(pipelines):.2f}")

        if "physical" in args.only:
            natives, ours = [], []
            for _ in range(args.repeat):
                wait_idle()
                natives.append(native_physical())
                wait_idle()
                ours.append(timed(backupd, config, "backup", "bench", "--method", "physical"))
            native_physical_s, ours_physical = median(natives), median(ours)
            print(f"physical: mariadb-backup --stream | zstd > file {native_physical_s:.1f}s{samples(natives)}; backupd "
                  f"backup --method physical {ours_physical:.1f}s{samples(ours)}; ratio "
                  f"{ours_physical / native_physical_s:.2f} (goal <= 1.1)")

        if "incr" in args.only:
            incremental(args, base, source, config, defaults, rows)

        if "pitr" in args.only:
            # PITR: archive binlogs, change 10% of the rows after a logical backup, restore to the newest state.
            ctx = JobContext(load_settings(config), "bench")
            archiver = ctx.driver.log_archivers()[0]
            stop = threading.Event()
            thread = threading.Thread(target=archiver.run, args=(stop,), daemon=True)
            thread.start()
            backupd(config, "backup", "bench")
            conn = source.credentials.connect()
            with conn.cursor() as cur:
                cur.execute(f"UPDATE bench.events SET amount = amount + 1 WHERE id % 10 = 0 AND id <= {rows}")
                cur.execute("SHOW MASTER STATUS")
                current = cur.fetchone()[0]
                cur.execute("FLUSH BINARY LOGS")
            conn.close()
            archive = ctx.log_archive("binlog")
            while not any(o.name == f"1/{current}" for o in archive.list()):
                time.sleep(0.5)
            stop.set()
            thread.join()
            ctx.close()
            install_db(restore_target.datadir, unsandboxed())
            restore_target.start()
            wait_idle()
            started = time.monotonic()
            out = backupd(config, "restore", "bench", "--to", f"mysql://root@localhost/?socket={restore_target.socket}")
            total = time.monotonic() - started
            load = re.search(r"dump loaded \(\d+ bytes\) in ([\d.]+)s", out)
            replay = re.search(r"replayed in ([\d.]+)s", out)
            print(f"PITR restore: total {total:.1f}s = dump load {load[1] if load else '?'}s + binlog replay "
                  f"{replay[1] if replay else '?'}s (+ fetch/decrypt)")
    finally:
        restore_target.stop()
        source.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
