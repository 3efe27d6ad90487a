"""Set-up shared by the commands: settings, job context, output helpers."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Protocol

from backupd.context import JobContext
from backupd.errors import BackupNotFound, UsageError
from backupd.settings import DEFAULT_CONFIG, Settings, load_settings
from backupd.timeutil import BACKUP_ID_RE

Handler = Callable[[argparse.Namespace], int]


class ConfigArgs(Protocol):
    """A parsed command line naming a configuration file (argparse's, or quick.Call for wal-push/wal-fetch)."""

    config: str | None


def config_path(args: ConfigArgs) -> Path:
    return Path(args.config or os.environ.get("BACKUPD_CONFIG") or DEFAULT_CONFIG)


def settings_from(args: ConfigArgs) -> Settings:
    """The configuration, loaded once per command line."""
    settings: Settings | None = getattr(args, "_settings", None)
    if settings is None:
        settings = load_settings(config_path(args))
        setattr(args, "_settings", settings)
    return settings


def with_job(func: Callable[[argparse.Namespace, JobContext], int]) -> Handler:
    """Load the configuration, resolve ``args.job`` and close storage afterwards."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        settings = settings_from(args)
        settings.job(args.job)  # unknown job -> ConfigError listing the known ones
        ctx = JobContext(settings, args.job, allow_unsigned=getattr(args, "allow_unsigned", False))
        try:
            return func(args, ctx)
        finally:
            ctx.close()

    return wrapper


def job_of_backup(args: argparse.Namespace) -> JobContext:
    """The one job (``args.job``, else any configured job) whose repository holds ``args.backup_id``.

    An id that several jobs hold (backups written before ids were claimed across jobs)
    is refused with the list of those jobs, never picked silently. The caller closes the context.
    """
    if not BACKUP_ID_RE.match(args.backup_id):
        raise UsageError(f"not a backup id (like 20261124T020000Z): {args.backup_id!r}")
    settings = settings_from(args)
    jobs = [args.job] if args.job else sorted(settings.jobs)
    found: list[JobContext] = []
    for job in jobs:
        settings.job(job)  # unknown --job -> ConfigError listing the known ones
        ctx = JobContext(settings, job)
        try:
            holds = ctx.repository.has_backup(args.backup_id)
        except BaseException:
            ctx.close()
            raise
        if holds:
            found.append(ctx)
        else:
            ctx.close()
    if len(found) == 1:
        return found[0]
    for ctx in found:
        ctx.close()
    if found:
        names = ", ".join(ctx.name for ctx in found)
        raise UsageError(f"backup id {args.backup_id} is ambiguous: jobs {names} each have one",
                         hint=f"name the job with --job (one of: {names})")
    raise BackupNotFound(f"backup {args.backup_id} not found in the repositories of: {', '.join(jobs) or 'no jobs'}")


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def printable(value: object, keep: str = "") -> str:
    """``value`` as text safe for a terminal: control and other non-printable characters
    (but those in ``keep``) escaped.

    Manifests and reports come from the repository, and whoever can write there can
    put terminal escape sequences in a host name or a table name.
    """
    text = str(value)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() or char in keep else char.encode("unicode_escape").decode("ascii")
                   for char in text)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line.rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
