"""Scale benchmark: what each everyday command costs as the repository grows (issue 22).

    .venv/bin/python bench/scale.py [--sizes 100:1000,1000:10000,10000:100000] [--storage fs,s3]
                                    [--checkout DIR] [--work DIR] [--pitr] [--flat]

Builds synthetic repositories of a sqlite job (BACKUPS backups, WAL archived log objects in the
current layout, ``wal/<timeline>/<segment[0:16]>/<segment>.zst.age``) by writing small objects directly: each backup is a valid manifest naming one stream whose size and
sha256 match (so ``verify --integrity-only`` reads and checks it); the streams are not age files,
so nothing here decrypts. ``s3`` is a moto server in a child process. Then runs, each in a fresh
process that imports backupd from ``--checkout`` (default: this one; pass /work/main to measure
the code before a change):

    show ID, restore --dry-run --backup ID, restore --dry-run --target-time T,
    verify --integrity-only --backup ID, list, prune --dry-run

and prints per command: seconds, peak RSS (MiB) and storage requests (the Storage object's calls,
a listing counted as one request per 1,000 keys; on S3, the HTTP requests botocore sent).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv" / "bin" / "python")
JOB = "shop"
START = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
STREAM = b"x" * 256
STREAM_SHA = hashlib.sha256(STREAM).hexdigest()
METHODS = ("put", "open", "stat", "delete", "list", "list_after", "read_versioned", "replace")


# ---- counting requests -------------------------------------------------------------------------

def count_requests(storage: Any, counts: dict[str, int]) -> Any:
    """Wrap the storage object's methods (in place) so ``counts`` gets one entry per request."""
    def counted(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            result = method(*args, **kwargs)
            if name in ("list", "list_after"):
                return _paged(result, name, counts)
            return result
        return call

    for name in METHODS:
        if hasattr(storage, name):
            setattr(storage, name, counted(name, getattr(storage, name)))
    client = getattr(storage, "_client", None)
    if client is not None:  # S3: the HTTP requests themselves
        def sent(**_: Any) -> None:
            counts["http"] = counts.get("http", 0) + 1
        client.meta.events.register("before-send.s3", sent)
    return storage


def _paged(items: Iterator[Any], name: str, counts: dict[str, int]) -> Iterator[Any]:
    for number, item in enumerate(items, start=1):
        if number % 1000 == 0:
            counts[name] += 1  # a further page
        yield item


def requests(counts: dict[str, int]) -> int:
    return counts["http"] if "http" in counts else sum(v for k, v in counts.items() if k != "http")


# ---- one command in a fresh process ------------------------------------------------------------

def run_one(argv: list[str]) -> dict[str, Any]:
    """Child mode: run ``backupd ARGV`` here with counted storage; return seconds, peak RSS, requests."""
    from backupd import context
    from backupd.cli.main import main

    counts: dict[str, int] = {}
    opened = context.open_storage
    context.open_storage = lambda settings, name: count_requests(opened(settings, name), counts)  # type: ignore
    started = time.monotonic()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        code = main(argv)
    seconds = time.monotonic() - started
    return {"code": code, "seconds": round(seconds, 3), "rss_mib": round(peak_rss_kib() / 1024, 1),
            "requests": requests(counts), "counts": counts}


def peak_rss_kib() -> int:
    """This process's peak RSS since its exec (VmHWM; ru_maxrss would carry the forking parent's over)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(checkout: Path, argv: list[str], env: dict[str, str], timeout: float = 600) -> dict[str, Any]:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[2]);"
            "import scale; print(json.dumps(scale.run_one(json.loads(sys.argv[3]))))")
    try:
        proc = subprocess.run([PYTHON, "-c", code, str(checkout), str(REPO / "bench"), json.dumps(argv)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env, "PYTHONPATH": str(checkout)})
    except subprocess.TimeoutExpired:
        return {"code": None, "seconds": float("inf"), "rss_mib": float("nan"), "requests": -1, "counts": {}}
    if proc.returncode != 0:
        raise RuntimeError(f"{argv}: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ---- building a repository ---------------------------------------------------------------------

def backup_id(number: int) -> str:
    return (START + dt.timedelta(hours=number)).strftime("%Y%m%dT%H%M%SZ")


def wal_name(number: int) -> str:
    return f"00000001{number >> 8:08X}{number & 0xFF:08X}"


def wal_key(number: int, flat: bool = False) -> str:
    """Where the current layout keeps WAL segment ``number`` (DESIGN.md: 256 segments a folder); with ``flat``,
    where the layout before folders (and before timeline directories, as older benchmarks wrote) did."""
    name = wal_name(number)
    return f"{JOB}/wal/{name}.zst.age" if flat else f"{JOB}/wal/{name[:8]}/{name[:16]}/{name}.zst.age"


def manifest(number: int, first_log: str | None = None) -> bytes:
    moment = START + dt.timedelta(hours=number)
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    finished = (moment + dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return json.dumps({
        "format_version": 1, "backup_id": backup_id(number), "job": JOB, "driver": "sqlite", "method": "logical",
        "host": "bench", "started_at": stamp, "finished_at": finished, "duration_seconds": 60.0,
        "raw_size": 1024, "stored_size": len(STREAM), "compression": {"algorithm": "zstd", "level": 3},
        "encryption": {"format": "age", "recipients": ["age1bench"]},
        "objects": [{"name": "db", "key": "db.zst.age", "raw_size": 1024, "stored_size": len(STREAM),
                     "sha256": STREAM_SHA}],
        "row_counts": {"orders": number}, "tool_versions": {"sqlite": "3"},
        "metadata": {"pitr": {"log_kind": "wal", "first_log": first_log, "from": stamp}} if first_log else {},
    }, indent=2).encode() + b"\n"


def objects(backups: int, wal: int, pitr: bool = False, flat: bool = False) -> Iterator[tuple[str, bytes]]:
    """With ``pitr``, backup N records that its logs begin with WAL object N * WAL / BACKUPS."""
    for number in range(backups):
        prefix = f"{JOB}/backups/{backup_id(number)}/"
        yield prefix + "db.zst.age", STREAM
        first = wal_name(number * wal // backups)
        yield prefix + "manifest.json", manifest(number, (first if flat else f"{first[:8]}/{first}") if pitr else None)
    for number in range(wal):
        yield wal_key(number, flat), b"w" * 64
    if not flat:
        yield f"{JOB}/state/wal-layout.json", b'{"logs": "foldered"}\n'  # as ``backupd migrate`` leaves it


def build_fs(root: Path, backups: int, wal: int, pitr: bool = False, flat: bool = False) -> None:
    made: set[Path] = set()
    for key, data in objects(backups, wal, pitr, flat):
        path = root / key
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(data)


def build_s3(endpoint: str, bucket: str, backups: int, wal: int, pitr: bool = False, flat: bool = False) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for _ in pool.map(lambda item: client.put_object(Bucket=bucket, Key="prod/" + item[0], Body=item[1]),
                          objects(backups, wal, pitr, flat)):
            pass


def config(work: Path, storage: dict[str, str]) -> Path:
    lines = ["[daemon]", f'state_dir = "{work}/state"', "", "[storage.main]"]
    lines += [f'{k} = "{v}"' for k, v in storage.items()]
    lines += ["", "[encryption]", 'recipients = ["age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"]',
              "", f"[jobs.{JOB}]", 'driver = "sqlite"', f'path = "{work}/db.sqlite3"', 'storage = "main"',
              "retention = { keep_last = 3, keep_daily = 7, keep_weekly = 4 }"]
    path = work / "backupd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def commands(backups: int, work: Path) -> dict[str, list[str]]:
    middle = backup_id(backups // 2)
    target = (START + dt.timedelta(hours=backups // 2, minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    to = str(work / "restored.sqlite3")
    return {
        "show": ["show", middle],
        "restore --dry-run --backup": ["restore", JOB, "--to", to, "--dry-run", "--backup", middle],
        "restore --dry-run --target-time": ["restore", JOB, "--to", to, "--dry-run", "--target-time", target],
        "verify --integrity-only --backup": ["verify", JOB, "--integrity-only", "--backup", middle],
        "list": ["list", JOB],
        "prune --dry-run": ["prune", JOB, "--dry-run"],
    }


@contextlib.contextmanager
def moto(work: Path) -> Iterator[str]:
    sys.path.insert(0, str(REPO / "tests"))
    from s3_server import DUMMY_AWS_ENV, moto_process

    os.environ.update(DUMMY_AWS_ENV)
    with moto_process(work / "moto.log") as endpoint:
        yield endpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100:1000,1000:10000,10000:100000", help="BACKUPS:WAL,...")
    parser.add_argument("--storage", default="fs,s3")
    parser.add_argument("--checkout", type=Path, default=REPO, help="the backupd source tree to measure")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--pitr", action="store_true",
                        help="backups record where their logs begin (backup N: WAL object N * WAL / BACKUPS)")
    parser.add_argument("--flat", action="store_true",
                        help="WAL in the layout before folders (as `backupd migrate` finds it), not the current one")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a command may take (then: stopped)")
    args = parser.parse_args()
    sizes = [tuple(int(n) for n in size.split(":")) for size in args.sizes.split(",")]
    work_root = Path(tempfile.mkdtemp(prefix="backupd-scale-", dir=args.work))
    rows = []
    for kind in args.storage.split(","):
        with (moto(work_root) if kind == "s3" else contextlib.nullcontext("")) as endpoint:
            for backups, wal in sizes:
                work = work_root / f"{kind}-{backups}-{wal}"
                work.mkdir()
                (work / "db.sqlite3").write_bytes(b"")
                built = time.monotonic()
                if kind == "s3":
                    bucket = f"scale-{backups}-{wal}"
                    build_s3(endpoint, bucket, backups, wal, args.pitr, args.flat)
                    storage = {"type": "s3", "bucket": bucket, "prefix": "prod/", "endpoint_url": endpoint,
                               "region": "us-east-1"}
                else:
                    build_fs(work / "repo", backups, wal, args.pitr, args.flat)
                    storage = {"type": "filesystem", "path": str(work / "repo")}
                print(f"# {kind} {backups} backups, {wal} WAL: built in {time.monotonic() - built:.1f} s",
                      file=sys.stderr)
                cfg = config(work, storage)
                env = {"BACKUPD_CONFIG": str(cfg)}
                # a first read builds any cache (the index; before it, the local catalog)
                measure(args.checkout, ["--log-level", "error", "list", JOB], env, args.timeout)
                for name, argv in commands(backups, work).items():
                    result = measure(args.checkout, ["--log-level", "error", *argv], env, args.timeout)
                    rows.append({"storage": kind, "backups": backups, "wal": wal, "command": name, **result})
                    print(f"{kind:3} {backups:>6} {wal:>7}  {name:34} {result['seconds']:>8.2f} s "
                          f"{result['rss_mib']:>7.1f} MiB {result['requests']:>7} req  exit {result['code']}",
                          file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'storage':7} {'backups':>7} {'WAL':>7}  {'command':34} {'seconds':>8} {'peak RSS':>9} {'requests':>8}")
        for r in rows:
            print(f"{r['storage']:7} {r['backups']:>7} {r['wal']:>7}  {r['command']:34} {r['seconds']:>8.2f} "
                  f"{r['rss_mib']:>5.0f} MiB {r['requests']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
