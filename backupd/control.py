"""The daemon's local control socket: one JSON request, one JSON reply, per connection.

Short-lived commands (``wal-push`` above all) hand work to a running daemon
through it and fall back to doing the work themselves when no daemon answers.
Handlers are looked up by ``op``; drivers contribute theirs through
``Driver.control_handlers()``.

Only trusted peers are served: the kernel names the client's uid (SO_PEERCRED)
and the server answers only the uids in ``ControlServer.peers`` (the daemon's
own, root's, and the clusters' OS users, ``job_peers``); every other client gets
a refusal. A request naming a file is confined to its job's data directory
(``confine``), so a peer cannot have the daemon read a file of its choosing.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

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
    """The client on the other end of a request."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def credentials(self) -> tuple[int, int, int]:
        """(pid, uid, gid) of the connecting process, from the kernel (SO_PEERCRED)."""
        raw = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", raw)  # type: ignore[return-value]


def job_peers(os_user: str | None, data_dir: Path | None) -> set[int]:
    """The uids a job's cluster runs as: its ``os_user`` and the owner of its data directory."""
    import pwd

    uids = set()
    if os_user:
        try:
            uids.add(pwd.getpwnam(os_user).pw_uid)
        except KeyError:
            pass
    if data_dir is not None:
        try:
            uids.add(os.stat(data_dir).st_uid)
        except OSError:
            pass
    return uids


def confine(path: object, root: Path) -> Path:
    """``path``, resolved, if it lies inside ``root`` once symlinks are resolved; ValueError naming it otherwise.

    ``..`` is refused outright. ``root`` may be named through a symlink (PostgreSQL's
    working directory, which ``%p`` is relative to, is the resolved one), and a path
    through one of ``root``'s own top-level symlinks (``pg_wal`` on another disk) stays inside.
    """
    if not isinstance(path, str) or not os.path.isabs(path):
        raise ValueError(f"needs an absolute path (got {path!r})")
    if ".." in Path(path).parts:
        raise ValueError(f"{path}: '..' is not allowed")
    lexical = Path(os.path.normpath(path))
    real_root = Path(root).resolve()
    for base in dict.fromkeys((Path(os.path.abspath(root)), real_root)):
        try:
            relative = lexical.relative_to(base)
        except ValueError:
            continue
        allowed = [real_root]
        if relative.parts and (base / relative.parts[0]).is_symlink():
            allowed.append((base / relative.parts[0]).resolve())
        resolved = lexical.resolve()
        if not any(resolved == top or top in resolved.parents for top in allowed):
            raise ValueError(f"{path}: resolves to {resolved}, outside the data directory {root}")
        return resolved
    raise ValueError(f"{path}: outside the data directory {root}")


class _RequestHandler(socketserver.StreamRequestHandler):
    server: "ControlServer"

    def handle(self) -> None:
        raw = self.rfile.readline(MAX_MESSAGE)  # read first: the client then sees the refusal, not a reset
        uid = Peer(self.connection).credentials()[1]
        if uid not in self.server.peers:
            from backupd.whoami import user_name

            self._reply({"ok": False, "fallback": "not a trusted peer",
                         "error": f"refused: uid {uid} ({user_name(uid)}) may not use this daemon's control socket "
                                  "(only the daemon's user, root and the clusters' OS users may)"})
            return
        try:
            message = json.loads(raw)
            handler = self.server.handlers.get(message.get("op", ""))
            if handler is None:
                reply = {"ok": False, "error": f"unknown op {message.get('op')!r}"}
            else:
                reply = handler(message)
        except Exception as exc:  # every failure becomes a reply; the client decides what to do
            from backupd.jobrun import describe

            reply = {"ok": False, "error": describe(exc)}
        self._reply(reply)

    def _reply(self, reply: dict[str, Any]) -> None:
        reply = {"ok": reply.get("ok") is True, **{key: value for key, value in reply.items() if key != "ok"}}
        try:
            self.wfile.write(json.dumps(reply).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a long request it gave up on): nobody to answer


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, handlers: dict[str, Handler], peers: Iterable[int] = ()) -> None:
        self.handlers = handlers
        #: uids served; the daemon adds the clusters' users (``job_peers``) when it loads its jobs.
        self.peers = frozenset({os.geteuid(), 0, *peers})
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
