#!/usr/bin/env python3
"""backupd's pipeline vs `zstd -3 -T0 | age -r` on the same file, in one run.

Usage: bench/pipeline.py [--sizes 1,4] [--level 3] [--dir DIR]

For each size (GiB) it generates realistic, partly compressible data (CSV rows like
a plain-text dump), then times (a) backupd: file -> zstd -> age -> sha256 ->
filesystem storage, in a child process whose peak RSS is measured, and (b) Debian's
CLIs `zstd -3 -T0 -c FILE | age -r RECIPIENT > OUT`. It prints MiB/s of each, their
ratio (backupd / CLI, higher is better) and backupd's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30


def generate(path: Path, size: int, seed: int = 7) -> None:
    """CSV rows of an orders table: ids, timestamps, amounts, words, a hex hash."""
    rng = random.Random(seed)
    words = [w.strip() for w in "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima "
             "mike november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu".split()]
    blocks = []
    for b in range(8):
        lines = []
        n = 0
        row = b * 10_000_000
        while n < 8 * MiB:
            row += 1
            line = (f"{row},{rng.randrange(1, 200000)},2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} "
                    f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d},"
                    f"{rng.randrange(100, 10_000_000) / 100:.2f},{rng.choice(words)} {rng.choice(words)} "
                    f"{rng.choice(words)},{rng.getrandbits(128):032x}\n")
            lines.append(line)
            n += len(line)
        blocks.append("".join(lines).encode())
    written = 0
    with open(path, "wb") as out:
        i = 0
        while written < size:
            block = blocks[i % len(blocks)][: size - written]
            out.write(block)
            written += len(block)
            i += 1


def run_backupd_child(source: Path, repo: Path, recipient: str, level: int) -> float:
    """Runs in a child process: returns seconds for the whole pipeline into storage."""
    from backupd import age
    from backupd.repository import Repository
    from storage.filesystem import FilesystemStorage

    repository = Repository(FilesystemStorage(repo), "bench")
    start = time.perf_counter()
    with open(source, "rb") as handle:
        entry = repository.write_stream("20261124T000000Z", "data", handle, [age.parse_recipient(recipient)], level)
    seconds = time.perf_counter() - start
    print(f"{seconds} {entry.raw_size} {entry.stored_size}")
    return seconds


def time_backupd(source: Path, work: Path, recipient: str, level: int) -> tuple[float, int, int]:
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(source), str(repo), recipient, str(level)],
                            stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"backupd pipeline failed with status {proc.returncode}")
    seconds, _raw, stored = out.strip().splitlines()[-1].split()
    shutil.rmtree(repo, ignore_errors=True)
    return float(seconds), int(stored), usage.ru_maxrss * 1024


def time_cli(source: Path, work: Path, recipient: str, level: int) -> tuple[float, int]:
    out_path = work / "cli.zst.age"
    start = time.perf_counter()
    with open(out_path, "wb") as out:
        zstd = subprocess.Popen(["zstd", f"-{level}", "-T0", "-q", "-c", str(source)], stdout=subprocess.PIPE)
        age_proc = subprocess.Popen(["age", "-r", recipient], stdin=zstd.stdout, stdout=out)
        zstd.stdout.close()  # type: ignore[union-attr]
        age_rc, zstd_rc = age_proc.wait(), zstd.wait()
        out.flush()
        os.fsync(out.fileno())
    seconds = time.perf_counter() - start
    if age_rc or zstd_rc:
        raise SystemExit(f"CLI pipeline failed: zstd {zstd_rc}, age {age_rc}")
    size = out_path.stat().st_size
    out_path.unlink()
    return seconds, size


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        run_backupd_child(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,4", help="comma-separated sizes in GiB (default 1,4)")
    parser.add_argument("--level", type=int, default=3)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir under /var/tmp)")
    args = parser.parse_args()
    for tool in ("zstd", "age"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (apt-get install {tool})")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from backupd import age

    recipient = str(age.X25519Identity.generate().to_recipient())
    work = Path(tempfile.mkdtemp(prefix="backupd-bench-", dir=args.dir or "/var/tmp"))
    print(f"machine: {os.cpu_count()} CPUs; zstd level {args.level}; work dir {work}")
    print(f"{'size':>6} {'backupd MiB/s':>14} {'CLI MiB/s':>10} {'ratio':>6} {'peak RSS':>9} {'stored':>9}")
    try:
        for gib in (float(s) for s in args.sizes.split(",")):
            size = int(gib * GiB)
            source = work / "data.csv"
            generate(source, size)
            time_cli(source, work, recipient, args.level)  # warm the page cache for both
            cli_s, cli_size = time_cli(source, work, recipient, args.level)
            bd_s, bd_size, rss = time_backupd(source, work, recipient, args.level)
            bd_rate, cli_rate = size / MiB / bd_s, size / MiB / cli_s
            print(f"{gib:>5g}G {bd_rate:>14.0f} {cli_rate:>10.0f} {bd_rate / cli_rate:>5.2f}x {rss / MiB:>7.0f}Mi "
                  f"{bd_size / size:>8.1%}  (CLI stored {cli_size / size:.1%})")
            source.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
