"""The daemon's local control socket: one JSON request, one JSON reply, per connection.

Short-lived commands (``wal-push`` above all) hand work to a running daemon
through it and fall back to doing the work themselves when no daemon answers.
Handlers are looked up by ``op``; drivers contribute theirs through
``Driver.control_handlers()``.
"""

from __future__ import annotations

import json
import os
import select
import socket
import socketserver
import struct
import threading
from pathlib import Path
from typing import Any, Callable

Handler = Callable[..., dict[str, Any]]
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


class Peer:
    """The client on the other end of a request, for handlers that run long (``with_peer``)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def credentials(self) -> tuple[int, int, int]:
        """(pid, uid, gid) of the connecting process, from the kernel (SO_PEERCRED)."""
        raw = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", raw)  # type: ignore[return-value]

    def watch_hangup(self, on_hangup: Callable[[], None], done: threading.Event) -> threading.Thread:
        """Call ``on_hangup`` if the client closes its end before ``done`` is set.

        The client sends its request and then only waits, so anything readable
        after the request (end of file, above all) means it went away.
        """
        def watch() -> None:
            poller = select.poll()
            poller.register(self._sock.fileno(), select.POLLIN | select.POLLRDHUP)
            while not done.is_set():
                if poller.poll(200):
                    if not done.is_set():
                        on_hangup()
                    return

        thread = threading.Thread(target=watch, name="control-peer", daemon=True)
        thread.start()
        return thread


def with_peer(handler: Callable[[dict[str, Any], Peer], dict[str, Any]]) -> Handler:
    """Mark a handler that also takes the request's ``Peer``."""
    handler.wants_peer = True  # type: ignore[attr-defined]
    return handler


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
                reply = handler(message, Peer(self.connection)) if getattr(handler, "wants_peer", False) \
                    else handler(message)
        except Exception as exc:  # every failure becomes a reply; the client decides what to do
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        reply = {"ok": reply.get("ok") is True, **{key: value for key, value in reply.items() if key != "ok"}}
        try:
            self.wfile.write(json.dumps(reply).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a long request it gave up on): nobody to answer


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
