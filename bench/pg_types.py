"""The backup-types part of bench/postgres.py (``--types``): backupd's file engine against pgBackRest at the
same process-max, side by side on one cluster, medians of --repeat rounds.

Each round: a full of each tool, 1% of pgbench_accounts updated, a diff of each, another 1%, an incr of each
(wall time and bytes stored by that backup); a restore of each tool's chain (restore command, start and
recovery to the end of the archive); then, with one relation file of that restored cluster damaged, a
delta restore over it (same, plus start and recovery). Every WAL segment is archived by both tools (one
archive_command runs both), so each backup waits for its own archive as usual. backupd's full backup is also
taken by pg_basebackup (a second job without data_dir: "today's engine").
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from drivers.postgres.cluster import Cluster, chown_tree, unsandboxed
from machine import wait_idle

TYPES = ("full", "diff", "incr")


def settle() -> None:
    """The previous step's writes on disk and the CPUs idle, waiting 15 s at most (a shared machine never is)."""
    wait_idle(timeout=15)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


class TypesBench:
    def __init__(self, bench: Any, run: Callable[..., str], timed: Callable[[list[str], str], float],
                 pg_bin: Path, job: str, backupd_exe: Path, stanza: str) -> None:
        self.bench = bench
        self.backupd_exe = backupd_exe
        self.stanza = stanza
        self.run = run
        self.timed = timed
        self.pg_bin = pg_bin
        self.job = job
        self.seconds: dict[str, dict[str, list[float]]] = {"backupd": {}, "pgbackrest": {}}
        self.stored: dict[str, dict[str, list[float]]] = {"backupd": {}, "pgbackrest": {}}
        self.notes: list[str] = []

    def record(self, tool: str, what: str, seconds: float, stored: float | None = None) -> None:
        self.seconds[tool].setdefault(what, []).append(seconds)
        if stored is not None:
            self.stored[tool].setdefault(what, []).append(stored)
        print(f"types: {tool} {what} {seconds:.1f} s" + (f", {stored / 2**20:.1f} MiB stored" if stored else ""),
              flush=True)

    # -- set-up --------------------------------------------------------------------------------
    def setup(self) -> None:
        bench = self.bench
        text = bench.config.read_text().replace('method = "logical"', 'method = "physical"\nprocess_max = 2')
        basebackup_job = text.split(f"[jobs.{self.job}]")[1].replace(f'data_dir = "{bench.primary.data}"\n', "")
        bench.config.write_text(text + f"\n[jobs.{self.job}_bb]" + basebackup_job)
        both = (f"{self.backupd_exe} --config {bench.config} wal-push --job {self.job} %p && "
                f"pgbackrest --config={bench.pgbr_config} --stanza={self.stanza} archive-push %p")
        bench.archive_command(both)
        self.run(bench.pgbackrest("stanza-create"), "pgbackrest stanza-create")
        self.run(bench.pgbackrest("check"), "pgbackrest check")

    def change(self, round_: int, step: int) -> None:
        """1% of pgbench_accounts updated in place (the rows keep their size), a different 1% each time."""
        rows = 100_000 * self.bench.args.scale
        share = rows // 100
        first = ((round_ * 2 + step) * share) % (rows - share) + 1
        with self.bench.primary.connect("bench") as conn:
            conn.execute("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN %s AND %s",
                         (first, first + share - 1))

    # -- backups -------------------------------------------------------------------------------
    def backupd_backup(self, kind: str, job: str | None = None) -> tuple[float, int]:
        argv = self.bench.backupd("backup", job or self.job, "--type", kind)
        started = time.monotonic()
        backup_id = self.run(argv, f"backupd backup --type {kind}").strip()
        seconds = time.monotonic() - started
        shown = json.loads(self.run(self.bench.backupd("show", backup_id, "--json"), "backupd show"))
        return seconds, int(shown["stored_size"])

    def pgbackrest_backup(self, kind: str) -> tuple[float, int]:
        seconds = self.timed(self.bench.pgbackrest("backup", f"--type={kind}"), f"pgbackrest backup --type={kind}")
        info = json.loads(self.run(self.bench.pgbackrest("info", "--output=json"), "pgbackrest info"))
        newest = info[0]["backup"][-1]
        return seconds, int(newest["info"]["repository"]["delta"])

    # -- restores ------------------------------------------------------------------------------
    def start_recovered(self, cluster: Cluster) -> None:
        cluster.prepare_root()
        cluster.configure({"archive_mode": False, "shared_buffers": "256MB"})
        cluster.start(timeout=3600)
        cluster.wait_promoted(timeout=3600)

    def restore_pair(self, tool: str, round_: int) -> None:
        bench = self.bench
        cluster = Cluster(bench.work / f"types-{tool}-{round_}", self.pg_bin,
                          unsandboxed(bench.work / f"types-{tool}-{round_}"))
        bench.clusters.append(cluster)
        if tool == "backupd":
            restore = bench.backupd("restore", self.job, "--to", str(cluster.data))
            delta = bench.backupd("restore", self.job, "--to", str(cluster.data), "--delta")
        else:
            cluster.data.mkdir(parents=True)
            chown_tree(cluster.root, "postgres")
            cluster.data.chmod(0o700)
            restore = bench.pgbackrest(f"--pg1-path={cluster.data}", "restore")
            delta = bench.pgbackrest(f"--pg1-path={cluster.data}", "restore", "--delta")
        settle()
        started = time.monotonic()
        self.run(restore, f"{tool} restore")
        self.start_recovered(cluster)
        self.record(tool, "chain restore + recovery", time.monotonic() - started)
        with cluster.connect("bench") as conn:
            relation = conn.execute("SELECT pg_relation_filepath('pgbench_accounts')").fetchone()[0]
        cluster.stop()
        with open(cluster.data / relation, "r+b") as handle:  # one damaged page in the biggest table
            handle.seek(8192 * 10)
            handle.write(b"\xff" * 8192)
        settle()
        started = time.monotonic()
        self.run(delta, f"{tool} restore --delta")
        self.start_recovered(cluster)
        self.record(tool, "delta restore + recovery", time.monotonic() - started)
        cluster.close()
        if not bench.args.keep:
            shutil.rmtree(cluster.root, ignore_errors=True)

    # -- the rounds ----------------------------------------------------------------------------
    def measure(self) -> None:
        bench = self.bench
        self.setup()
        for round_ in range(bench.args.repeat):
            bench.quiet(vacuum=True)
            seconds = self.timed(bench.backupd("backup", f"{self.job}_bb", "--method", "physical"),
                                 "backupd backup (pg_basebackup)")
            self.record("backupd", "full (pg_basebackup engine)", seconds)
            for step, kind in enumerate(TYPES):
                if kind != "full":
                    self.change(round_, step)
                    settle()
                for tool in ("backupd", "pgbackrest") if round_ % 2 == 0 else ("pgbackrest", "backupd"):
                    settle()
                    seconds, stored = (self.backupd_backup if tool == "backupd" else self.pgbackrest_backup)(kind)
                    self.record(tool, kind, seconds, stored)
            for tool in ("backupd", "pgbackrest") if round_ % 2 == 0 else ("pgbackrest", "backupd"):
                self.restore_pair(tool, round_)

    def report(self) -> None:
        print()
        print(f"PostgreSQL backup types: pgbench scale {self.bench.args.scale}, 1% of pgbench_accounts updated "
              f"before each diff and incr, process-max 2 for both, medians of {self.bench.args.repeat} rounds")
        header = ("measure", "backupd s", "pgbackrest s", "ratio", "backupd MiB", "pgbackrest MiB", "ratio")
        lines = [header]
        for what in [*TYPES, "chain restore + recovery", "delta restore + recovery"]:
            ours, theirs = median(self.seconds["backupd"].get(what, [])), median(self.seconds["pgbackrest"].get(what, []))
            mine_b, theirs_b = (median(self.stored[t].get(what, [])) / 2**20 for t in ("backupd", "pgbackrest"))
            lines.append((what, f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}" if theirs else "-",
                          f"{mine_b:.1f}" if mine_b else "-", f"{theirs_b:.1f}" if theirs_b else "-",
                          f"{mine_b / theirs_b:.2f}" if theirs_b else "-"))
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        for row in lines:
            print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        bb, files = self.seconds["backupd"].get("full (pg_basebackup engine)", []), self.seconds["backupd"]["full"]
        print(f"  full backup, backupd's file engine {median(files):.1f} s vs its pg_basebackup engine "
              f"{median(bb):.1f} s (runs {' '.join(f'{v:.1f}' for v in bb)})")
        for tool in ("backupd", "pgbackrest"):
            for what, values in self.seconds[tool].items():
                print(f"  runs: {tool} {what}: {' '.join(f'{v:.1f}' for v in values)} s")
        for note in self.notes:
            print(f"  note: {note}")
