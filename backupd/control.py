"""The daemon's local control socket: one JSON request, one JSON reply, per connection.

Short-lived commands (``wal-push`` above all) hand work to a running daemon
through it and fall back to doing the work themselves when no daemon answers.
Handlers are looked up by ``op``; drivers contribute theirs through
``Driver.control_handlers()``.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any, Callable

Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_MESSAGE = 1 << 20
SOCKET_NAME = "control.sock"
#: Every reply starts with its "ok" member, so a client can tell success from these bytes alone.
OK_REPLY = b'{"ok": true'


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def request(path: Path, message: dict[str, Any], timeout: float = 60.0) -> dict[str, Any] | None:
    """Send one request; None when no daemon listens there (the caller does the work itself)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, PermissionError, socket.timeout):
            return None
        sock.sendall(json.dumps(message).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
            if len(data) > MAX_MESSAGE:
                raise ValueError("control reply too large")
        return json.loads(data) if data else None
    finally:
        sock.close()


class _RequestHandler(socketserver.StreamRequestHandler):
    server: "ControlServer"

    def handle(self) -> None:
        raw = self.rfile.readline(MAX_MESSAGE)
        try:
            message = json.loads(raw)
            handler = self.server.handlers.get(message.get("op", ""))
            if handler is None:
                reply = {"ok": False, "error": f"unknown op {message.get('op')!r}"}
            else:
                reply = handler(message)
        except Exception as exc:  # every failure becomes a reply; the client decides what to do
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        reply = {"ok": reply.get("ok") is True, **{key: value for key, value in reply.items() if key != "ok"}}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.handlers = handlers
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()  # the daemon lock guarantees no other daemon owns it
        super().__init__(str(path), _RequestHandler)
        os.chmod(path, 0o660)
        self._thread = threading.Thread(target=self.serve_forever, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.path.unlink(missing_ok=True)
