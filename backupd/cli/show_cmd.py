"""backupd show BACKUP_ID [--job JOB] [--json]: one manifest."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Iterator

from backupd.cli.common import human_size, job_of_backup, print_json, printable
from backupd.manifest import Manifest
from backupd.signing import Trust
from backupd.timeutil import format_timestamp


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("show", help="show a backup's manifest")
    parser.add_argument("backup_id")
    parser.add_argument("--job", help="look only in this job's repository")
    parser.add_argument("--json", action="store_true", help="the manifest as JSON")
    parser.set_defaults(handler=run)


def find(args: argparse.Namespace) -> tuple[Manifest, Trust | None]:
    """The manifest and what its signature says (an untrusted one is shown, marked, never hidden), its
    metadata as the driver shows it (a physical backup's file map filled in where this host can read it)."""
    ctx = job_of_backup(args)
    try:
        manifest, trust = ctx.repository.read_manifest(args.backup_id)
        if trust is None or trust.status != "bad":
            manifest = dataclasses.replace(manifest, metadata=ctx.driver.shown_metadata(manifest))
        return manifest, trust
    finally:
        ctx.close()


def run(args: argparse.Namespace) -> int:
    manifest, trust = find(args)
    if args.json:
        print_json(manifest.to_dict())  # JSON escapes control characters itself
        return 0
    for line in describe(manifest, trust):
        print(printable(line))
    return 0


def describe(manifest: Manifest, trust: Trust | None = None) -> list[str]:
    """The human-readable lines (before escaping: the caller makes them safe for a terminal)."""
    lines: list[str] = []
    add = lines.append
    add(f"backup      {manifest.backup_id}")
    if trust is not None:
        add(f"signature   {trust}" + (f" ({trust.problem})" if trust.problem else ""))
    add(f"job         {manifest.job} ({manifest.driver}, {manifest.method})")
    add(f"type        {manifest.backup_type}" + (f" of parent {manifest.parent}" if manifest.parent else ""))
    add(f"host        {manifest.host}")
    add(f"started     {format_timestamp(manifest.started_at)}")
    add(f"finished    {format_timestamp(manifest.finished_at)} ({manifest.duration_seconds:.1f} s)")
    add(f"size        {human_size(manifest.raw_size)} raw, {human_size(manifest.stored_size)} stored")
    add(f"compression zstd level {manifest.compression.get('level')}")
    add(f"encryption  {manifest.encryption.get('format')} to {', '.join(manifest.encryption.get('recipients', []))}")
    add("objects")
    for obj in manifest.objects:
        add(f"  {obj.key}  {human_size(obj.raw_size)} raw  {human_size(obj.stored_size)} stored  sha256 {obj.sha256}")
    if manifest.row_counts:
        add("row counts")
        for table, count in sorted(manifest.row_counts.items()):
            add(f"  {table}  {count}")
    if manifest.metadata:
        add("metadata")
        for key, value in flatten(manifest.metadata):
            add(f"  {key}  {value}")
    if manifest.tool_versions:
        add("tools       " + ", ".join(f"{k} {v}" for k, v in sorted(manifest.tool_versions.items())))
    return lines


LONG_LIST = 20


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Nested metadata as ``dotted.key  text`` pairs: plain text and JSON, never Python reprs."""
    if isinstance(value, dict) and value:
        for key in sorted(value, key=str):
            yield from flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and all(isinstance(item, (str, int, float)) for item in value):
        yield prefix, ", ".join(str(item) for item in value) if value else "-"
    elif isinstance(value, list) and len(value) > LONG_LIST:  # a physical backup's per-file map
        yield prefix, f"{len(value)} entries (`show --json` lists them)"
    elif isinstance(value, (dict, list)):
        yield prefix, json.dumps(value, sort_keys=True) if value else "-"
    elif value is None:
        yield prefix, "-"
    elif isinstance(value, bool):
        yield prefix, "yes" if value else "no"
    else:
        yield prefix, str(value)
