"""A small RESP2 client: enough for AUTH, INFO, CONFIG GET, user checks and the replication handshake.

The replication handshake reads the RDB payload from the same socket that
carried the commands, so the client exposes its buffered byte reader
(``read_line``, ``recv_into_buffer``) instead of hiding the socket behind a
library.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from backupd.errors import DriverError

DEFAULT_PORT = 6379
SCHEMES = ("redis", "rediss", "unix")
RECV_CHUNK = 1 << 16
MAX_LINE = 64 * 1024


class RedisReplyError(Exception):
    """The server answered a command with an error reply (``-ERR ...``)."""


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect, parsed from ``redis://``, ``rediss://`` or ``unix://`` URLs."""

    host: str | None = None
    port: int = DEFAULT_PORT
    path: str | None = None  # unix socket
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0

    @property
    def where(self) -> str:
        """The endpoint for messages: never carries the password."""
        if self.path:
            return f"unix://{self.path}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}"


def parse_dsn(dsn: str) -> Endpoint:
    """Parse a Redis URL; raise ValueError naming what is wrong (never echoing a password)."""
    parts = urlsplit(dsn)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, not {scheme or 'no'} scheme")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if scheme == "unix":
        if not parts.path:
            raise ValueError("unix:// URL needs a socket path, e.g. unix:///run/redis/redis.sock")
        return Endpoint(path=parts.path, username=username, password=password, db=_query_db(parts.query))
    if not parts.hostname:
        raise ValueError("URL has no host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError("port is not a number from 1 to 65535") from None
    db_text = parts.path.strip("/")
    if db_text and not db_text.isdigit():
        raise ValueError(f"path must be a database number, e.g. /0 (got /{db_text})")
    return Endpoint(host=parts.hostname, port=port, tls=scheme == "rediss", username=username,
                    password=password, db=int(db_text or _query_db(parts.query)))


def _query_db(query: str) -> int:
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if key == "db":
            if not value.isdigit():
                raise ValueError(f"db must be a number (got {value!r})")
            return int(value)
    return 0


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


def tls_context(files: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(files.ca_file) if files.ca_file else None)
    if files.cert_file:
        context.load_cert_chain(str(files.cert_file), str(files.key_file) if files.key_file else None)
    return context


class Connection:
    """One blocking connection. Every failure surfaces as DriverError naming the endpoint."""

    def __init__(self, endpoint: Endpoint, *, timeout: float = 60.0, connect_timeout: float = 10.0,
                 tls: TlsFiles = TlsFiles()) -> None:
        self.endpoint = endpoint
        self.where = endpoint.where
        self._buffer = bytearray()
        self._sock = self._connect(timeout, connect_timeout, tls)

    def _connect(self, timeout: float, connect_timeout: float, tls: TlsFiles) -> socket.socket:
        ep = self.endpoint
        try:
            if ep.path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(connect_timeout)
                sock.connect(ep.path)
            else:
                sock = socket.create_connection((ep.host, ep.port), timeout=connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if ep.tls:
                    sock = tls_context(tls).wrap_socket(sock, server_hostname=ep.host)
        except ssl.SSLError as exc:
            raise DriverError(f"{self.where}: TLS handshake failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise DriverError(f"{self.where}: cannot connect: {exc.strerror or exc}") from None
        sock.settimeout(timeout)
        return sock

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- commands -------------------------------------------------------------------

    def send(self, *args: str | bytes | int) -> None:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        try:
            self._sock.sendall(b"".join(parts))
        except OSError as exc:
            raise DriverError(f"{self.where}: connection lost while sending: {exc.strerror or exc}") from None

    def command(self, *args: str | bytes | int) -> Any:
        """Send one command and return its reply; an error reply raises RedisReplyError."""
        self.send(*args)
        reply = self.read_reply()
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    def authenticate(self) -> None:
        """AUTH (with the ACL user when one is named) and SELECT; clear errors for both."""
        ep = self.endpoint
        if ep.password is not None:
            args = ("AUTH", ep.username, ep.password) if ep.username else ("AUTH", ep.password)
            try:
                self.command(*args)
            except RedisReplyError as exc:
                who = f"user {ep.username!r}" if ep.username else "the default user"
                raise DriverError(f"{self.where}: authentication as {who} failed: {_first_word_reason(exc)}",
                                  hint="check the job's password_file (and the user in dsn)") from None
        try:
            self.command("PING")
        except RedisReplyError as exc:
            if str(exc).startswith("NOAUTH"):
                raise DriverError(f"{self.where}: the server requires a password and none is configured",
                                  hint="set password_file for the job") from None
            raise DriverError(f"{self.where}: PING failed: {exc}") from None

    def info(self, section: str) -> dict[str, str]:
        text = self.command("INFO", section)
        fields: dict[str, str] = {}
        for line in (text or b"").decode(errors="replace").splitlines():
            if line and not line.startswith("#") and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value
        return fields

    # ---- reading ----------------------------------------------------------------------

    def read_reply(self) -> Any:
        line = self.read_line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode(errors="replace")
        if kind == b"-":
            return RedisReplyError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self.read_exact(size + 2)
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            return [self.read_reply() for _ in range(count)]
        raise DriverError(f"{self.where}: protocol error: unexpected reply {line[:40]!r}")

    def read_line(self) -> bytes:
        """One CRLF- (or LF-) terminated line, without its terminator."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                return line.removesuffix(b"\r")
            if len(self._buffer) > MAX_LINE:
                raise DriverError(f"{self.where}: protocol error: line longer than {MAX_LINE} bytes")
            self.fill()

    def read_exact(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self.fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes: what is buffered, else one receive."""
        if not self._buffer:
            self.fill()
        data = bytes(self._buffer[:limit])
        del self._buffer[:limit]
        return data

    def fill(self) -> None:
        try:
            chunk = self._sock.recv(RECV_CHUNK)
        except socket.timeout:
            raise DriverError(f"{self.where}: no data from the server for {self._sock.gettimeout():.0f} s") from None
        except OSError as exc:
            raise DriverError(f"{self.where}: connection lost: {exc.strerror or exc}") from None
        if not chunk:
            raise DriverError(f"{self.where}: the server closed the connection")
        self._buffer += chunk


def _first_word_reason(exc: RedisReplyError) -> str:
    text = str(exc)
    code, _, rest = text.partition(" ")
    return f"{code}: {rest}" if code.isupper() and rest else text
