"""The ``backupd`` command: parse, configure logging, dispatch, report errors with their exit status (``backupd.jobrun``)."""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs each WAL file a few ms
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from backupd.errors import BackupdError

#: command -> module in backupd.cli. Only the module of the command being run is
#: imported: PostgreSQL starts `wal-push` once per WAL segment, so start-up counts.
COMMANDS = {
    "backup": "backup_cmd", "list": "list_cmd", "show": "show_cmd", "restore": "restore_cmd",
    "verify": "verify_cmd", "prune": "prune_cmd", "pin": "pin_cmd", "unpin": "pin_cmd", "check": "check_cmd",
    "keys": "keys_cmd", "run": "run_cmd", "wal-push": "wal_push_cmd", "wal-fetch": "wal_fetch_cmd",
    "status": "status_cmd", "copy": "copy_cmd", "migrate": "migrate_cmd",
}
FAST_COMMANDS = ("wal-push", "wal-fetch")
FAST_MODULES = {COMMANDS[command]: command for command in FAST_COMMANDS}
_OPTIONS_WITH_VALUES = {"--config", "--log-format", "--log-level"}


def requested_command(argv: Sequence[str]) -> str | None:
    """The command word in argv (skipping global options and their values), if any."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _OPTIONS_WITH_VALUES:
            skip = True
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    import argparse
    import importlib

    from backupd import __version__, logs

    parser = argparse.ArgumentParser(prog="backupd", description="Backup and point-in-time recovery for databases.")
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $BACKUPD_CONFIG, else /etc/backupd/backupd.toml)")
    parser.add_argument("--log-format", choices=("json", "console"), help="default: console on a TTY, else json")
    parser.add_argument("--log-level", choices=logs.LEVELS, default="info")
    parser.add_argument("--version", action="version", version=f"backupd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[only]] if only else list(dict.fromkeys(COMMANDS.values()))
    for module in modules:
        if module in FAST_MODULES:  # listed for --help only: backupd.cli.quick reads these command lines
            from backupd.cli.quick import SUMMARY

            command = FAST_MODULES[module]
            sub.add_parser(command, help=SUMMARY[command].replace("%", "%%"), add_help=False)
            continue
        importlib.import_module(f"backupd.cli.{module}").register(sub)
    return parser


def report(exc: BackupdError) -> None:
    from backupd.cli.common import printable
    from backupd.errors import ConfigError
    from backupd.logs import write_stderr
    from backupd.redact import redact

    def safe(text: str) -> str:  # messages may quote the repository or restored content: no terminal escapes
        return printable(redact(text), keep="\n")

    lines = [f"backupd: error: {safe(str(exc))}"]
    if isinstance(exc, ConfigError):
        lines.extend(f"  {safe(line)}" for line in exc.errors)
    if exc.hint:
        lines.append(f"hint: {safe(exc.hint)}")
    write_stderr("".join(f"{line}\n" for line in lines))


#: Every file backupd creates is its own: state, spool, scratch, temporary and plaintext files.
UMASK = 0o077


def main(argv: Sequence[str] | None = None) -> int:
    import atexit
    import gc
    import os

    os.umask(UMASK)  # first, whoever starts us (shell, cron, systemd, PostgreSQL's archive_command)
    # The process ends with the command, which has closed and synced all it wrote (manifest last): nothing at exit
    # waits for the cycle collector, whose passes over every object the command loaded cost ~60 ms CPU at exit.
    atexit.unregister(gc.freeze)  # once, however often main() runs in one process (tests)
    atexit.register(gc.freeze)
    if argv is None:
        argv = sys.argv[1:]
    command = requested_command(argv)
    if command in FAST_COMMANDS:  # once per WAL file: the import-light path reads the command line
        from backupd.cli import quick

        call = quick.run(list(argv))
        if isinstance(call, int):
            return call

        def handler() -> int:  # the fast path could not finish: the full command, same call, same process
            import importlib

            return importlib.import_module(f"backupd.cli.{COMMANDS[command]}").run(call)
    else:
        args = build_parser(command).parse_args(argv)

        def handler() -> int:
            from backupd.cli.around import run_handler

            logs.configure(args.log_format, args.log_level)
            return run_handler(args)  # TTY progress and the audit trail around the command
    from backupd import logs

    try:
        return handler()  # per-WAL-file commands configure logging themselves, and are neither audited nor drawn
    except (Exception, KeyboardInterrupt) as exc:
        from backupd import jobrun

        error = jobrun.as_error(exc)  # backupd's own, or an OS error on its own files (disk full, permissions)
        if error is not None:
            report(error)
        elif isinstance(exc, KeyboardInterrupt):
            logs.write_stderr("backupd: interrupted\n")
        else:  # a bug: say so plainly, keep the traceback in the log
            import structlog

            from backupd.redact import redact

            structlog.get_logger("backupd").exception("internal error")
            logs.write_stderr(f"backupd: internal error: {type(exc).__name__}: {redact(str(exc))}\n")
        return jobrun.exit_status(exc)


if __name__ == "__main__":
    sys.exit(main())
