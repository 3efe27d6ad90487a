"""``backupd backup JOB`` through the running daemon, before argparse or any heavy import.

A Python start-up that loads the configuration, pydantic, psycopg and the
pipeline costs about 0.2 s before the dump tool starts; a daemon has all of it
loaded. So when a daemon listens on the configuration's control socket, runs
the same configuration (``backupd.configprint``) and stderr is not a terminal
(a terminal gets the local run's progress line), the command sends it the
request and waits: the daemon takes the backup (``backupd.daemon.requested``),
and the command prints its id, logs the result and exits as a local run would.
Whatever else (other options, no daemon, the daemon declines) returns None and
the command runs the backup itself.
"""

from __future__ import annotations

import json
import os
import sys
import time

from backupd.cli import quick
from backupd.configprint import fingerprint
from backupd.whoami import current_user

LEVELS = ("debug", "info", "warning", "error")


def parse(argv: list[str]) -> dict[str, object] | None:
    options: dict[str, object] = {"config": None, "log_format": None, "log_level": "info"}
    words = list(argv)
    request: dict[str, object] = {}
    command_seen = False
    while words:
        word = words.pop(0)
        option, eq, value = word.partition("=")
        if not option.startswith("--"):
            if not command_seen:
                if word != "backup":
                    return None
                command_seen = True
            elif "job" in request:
                return None
            else:
                request["job"] = word
            continue
        if not eq:
            if not words:
                return None
            value = words.pop(0)
        if not command_seen and option in ("--config", "--log-format", "--log-level"):
            options[option[2:].replace("-", "_")] = value
        elif command_seen and option == "--method":
            request["method"] = value
        elif command_seen and option == "--wait":
            try:
                request["wait"] = float(value)
            except ValueError:
                return None
        else:
            return None
    if "job" not in request or options["log_format"] not in (None, "json", "console") \
            or options["log_level"] not in LEVELS:
        return None
    return {**options, "request": request}


def run(argv: list[str]) -> int | None:
    if sys.stderr.isatty():
        return None
    call = parse(argv)
    if call is None:
        return None
    config = quick.config_path(call["config"])  # type: ignore[arg-type]
    state = quick.state_dir(call["config"])  # type: ignore[arg-type]
    printed = fingerprint(config)
    if state is None or printed is None:
        return None
    message = {"op": "backup", **call["request"], "fingerprint": printed,  # type: ignore[dict-item]
               "user": current_user()}
    reply = _ask(os.path.join(state, quick.SOCKET_NAME), message)
    if reply is None or "fallback" in reply:
        return None
    if reply.get("ok") is True:
        _log(call, reply)
        print(reply["backup_id"], flush=True)
        return 0
    print(f"backupd: error: {reply.get('error', 'the daemon gave no reason')}", file=sys.stderr)
    for line in reply.get("errors") or ():
        print(f"  {line}", file=sys.stderr)
    if reply.get("hint"):
        print(f"hint: {reply['hint']}", file=sys.stderr)
    code = reply.get("exit_code")
    return code if isinstance(code, int) and code > 0 else 1


def _ask(path: str, message: dict[str, object]) -> dict[str, object] | None:
    """The daemon's reply; None when no daemon listens. The socket stays open both ways
    until the reply, so closing it (Ctrl-C, kill) tells the daemon to abort the backup."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except OSError:
            return None
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = bytearray()
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except KeyboardInterrupt:
        print("backupd: interrupted; the daemon aborts the backup", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        sock.close()
    if not data:
        return {"ok": False, "error": "the daemon closed the connection before the backup finished "
                                      "(stopped or crashed: see its log)", "exit_code": 1}
    return json.loads(data)


def _log(call: dict[str, object], reply: dict[str, object]) -> None:
    """The local run's "backup finished" line, saying which daemon took the backup."""
    if LEVELS.index(call["log_level"]) > LEVELS.index("info"):  # type: ignore[arg-type]
        return
    fields = {key: reply[key] for key in ("raw", "stored", "seconds")}
    fields.update(event="backup finished", job=reply["job"], method=reply["method"], backup_id=reply["backup_id"],
                  daemon_pid=reply["daemon_pid"], level="info", logger="backupd.backup",
                  timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if call["log_format"] == "console":
        extra = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("event", "level", "timestamp", "logger"))
        print(f"{fields['timestamp']} [info     ] backup finished (by the running daemon) {extra}", file=sys.stderr)
    else:
        print(json.dumps(fields), file=sys.stderr)
