"""The ``backupd`` command: parse, configure logging, dispatch, map errors to exit codes."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import structlog

from backupd import __version__, logs
from backupd.cli import backup_cmd, check_cmd, keys_cmd, list_cmd, restore_cmd, show_cmd, verify_cmd
from backupd.cli import pin_cmd, prune_cmd, run_cmd
from backupd.cli import wal_fetch_cmd, wal_push_cmd
from backupd.cli.around import run_handler
from backupd.errors import EXIT_FAILURE, BackupdError, ConfigError
from backupd.redact import redact

COMMANDS = (backup_cmd, list_cmd, show_cmd, restore_cmd, verify_cmd, prune_cmd, pin_cmd, check_cmd, keys_cmd, run_cmd,
            wal_push_cmd, wal_fetch_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backupd", description="Backup and point-in-time recovery for databases.")
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $BACKUPD_CONFIG, else /etc/backupd/backupd.toml)")
    parser.add_argument("--log-format", choices=("json", "console"), help="default: console on a TTY, else json")
    parser.add_argument("--log-level", choices=logs.LEVELS, default="info")
    parser.add_argument("--version", action="version", version=f"backupd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def report(exc: BackupdError) -> None:
    print(f"backupd: error: {redact(str(exc))}", file=sys.stderr)
    if isinstance(exc, ConfigError):
        for line in exc.errors:
            print(f"  {redact(line)}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_format, args.log_level)
    try:
        return run_handler(args)  # TTY progress and the audit trail around the command
    except BackupdError as exc:
        report(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("backupd: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so plainly, keep the traceback in the log
        structlog.get_logger("backupd").exception("internal error")
        print(f"backupd: internal error: {type(exc).__name__}: {redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
