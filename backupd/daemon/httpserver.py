"""``/metrics`` (Prometheus text format) and ``/healthz`` on ``daemon.metrics_listen``."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backupd.errors import BackupdError
from backupd.metrics import REGISTRY

log = structlog.get_logger(__name__)

#: Returns (healthy, details); details are served as JSON.
HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]


class _Handler(BaseHTTPRequestHandler):
    server: "MetricsServer"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            try:
                healthy, details = self.server.health()
            except Exception as exc:  # a broken health check is itself unhealthy
                healthy, details = False, {"reasons": [f"health check failed: {exc}"]}
            body = json.dumps({"status": "ok" if healthy else "unhealthy", **details}, sort_keys=True).encode()
            self._send(200 if healthy else 503, body + b"\n", "application/json")
        elif path == "/":
            self._send(200, b"backupd: see /metrics and /healthz\n", "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # scrapes every 15 s would drown the log


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listen: str, health: HealthCheck) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        self.health = health
        if ":" in host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, int(port)), _Handler)
        except OSError as exc:
            raise BackupdError(f"daemon.metrics_listen {listen}: cannot listen: {exc.strerror or exc}",
                               hint="another process may use the port; change daemon.metrics_listen") from None
        self._thread = threading.Thread(target=self.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
