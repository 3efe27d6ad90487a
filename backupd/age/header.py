"""The age v1 header: strict base64, recipient stanzas, the header MAC, and an
incremental parser that rejects anything but the canonical encoding."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from backupd.age.errors import HeaderError

VERSION_LINE = b"age-encryption.org/v1"
INTRO = b"age-encryption.org/"
COLUMNS = 64
BYTES_PER_LINE = COLUMNS // 4 * 3
MAC_SIZE = 32
MAX_HEADER_SIZE = 1 << 20
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(s: str | bytes) -> bytes:
    """Unpadded standard base64, canonical only; raises ValueError."""
    raw = s.encode("ascii") if isinstance(s, str) else bytes(s)
    if raw.translate(None, _B64_ALPHABET) or len(raw) % 4 == 1:
        raise ValueError("invalid unpadded base64")
    data = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
    if base64.b64encode(data).rstrip(b"=") != raw:
        raise ValueError("non-canonical base64")
    return data


def hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt or None, info=info).derive(ikm)


def header_mac(file_key: bytes, header: bytes) -> bytes:
    """MAC over the header up to and including the final '---'."""
    return hmac.new(hkdf(file_key, b"", b"header"), header, hashlib.sha256).digest()


def _is_argument(arg: bytes) -> bool:
    return bool(arg) and all(33 <= c <= 126 for c in arg)


@dataclass(frozen=True)
class Stanza:
    type: str
    args: tuple[str, ...]
    body: bytes

    def __post_init__(self) -> None:
        for arg in (self.type, *self.args):
            if not arg.isascii() or not _is_argument(arg.encode("ascii")):
                raise ValueError(f"invalid stanza argument {arg!r}")

    def encode(self) -> bytes:
        line = " ".join(("->", self.type, *self.args)).encode("ascii")
        body = base64.b64encode(self.body).rstrip(b"=")
        lines = [line] + [body[i : i + COLUMNS] for i in range(0, len(body), COLUMNS)]
        if len(body) % COLUMNS == 0:
            lines.append(b"")
        return b"\n".join(lines) + b"\n"


def encode_header(stanzas: Sequence[Stanza], file_key: bytes) -> bytes:
    signed = b"".join([VERSION_LINE, b"\n", *(s.encode() for s in stanzas), b"---"])
    return signed + b" " + b64encode(header_mac(file_key, signed)).encode("ascii") + b"\n"


def _show(line: bytes) -> str:
    return repr(line[:80]) + ("..." if len(line) > 80 else "")


class HeaderParser:
    """Fed bytes until feed() returns True; then stanzas, mac, signed (the bytes the
    MAC covers) and rest (whatever followed the header) are set."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._state = "version"
        self._type = ""
        self._args: tuple[str, ...] = ()
        self._body = bytearray()
        self.stanzas: list[Stanza] = []
        self.mac = b""
        self.signed = b""
        self.rest = memoryview(b"")

    def feed(self, data: bytes | bytearray | memoryview) -> bool:
        buf = self._buf
        buf += data
        while self._state != "done":
            end = buf.find(b"\n", self._pos)
            if end < 0:
                self._check_partial()
                return False
            if end > MAX_HEADER_SIZE:
                raise HeaderError(f"header larger than {MAX_HEADER_SIZE} bytes")
            line = bytes(buf[self._pos : end])
            start, self._pos = self._pos, end + 1
            self._line(line, start)
        self.rest = memoryview(buf)[self._pos :]
        return True

    def finish(self) -> None:
        """The input ended: complain about an incomplete header."""
        if not self._buf:
            raise HeaderError("empty input: not an age file")
        if self._state != "done":
            raise HeaderError("truncated header")

    def _check_partial(self) -> None:
        pending = bytes(self._buf[self._pos : self._pos + len(INTRO)])
        if self._state == "version" and not INTRO.startswith(pending):
            raise HeaderError("not an age file: missing 'age-encryption.org/' version line")
        if len(self._buf) > MAX_HEADER_SIZE:
            raise HeaderError(f"header larger than {MAX_HEADER_SIZE} bytes")

    def _line(self, line: bytes, start: int) -> None:
        if self._state == "version":
            if line != VERSION_LINE:
                if line.startswith(INTRO):
                    raise HeaderError(f"unsupported age format version {_show(line)}")
                raise HeaderError(f"not an age file: bad version line {_show(line)}")
            self._state = "stanza"
        elif self._state == "body":
            self._body_line(line)
        elif line.startswith(b"---"):
            self._end_line(line, start)
        elif line.startswith(b"->"):
            parts = line.split(b" ")
            if parts[0] != b"->" or len(parts) < 2 or not all(map(_is_argument, parts[1:])):
                raise HeaderError(f"malformed stanza line {_show(line)}")
            self._type = parts[1].decode("ascii")
            self._args = tuple(p.decode("ascii") for p in parts[2:])
            self._state = "body"
        else:
            raise HeaderError(f"unexpected header line {_show(line)}")

    def _body_line(self, line: bytes) -> None:
        if len(line) > COLUMNS:
            raise HeaderError(f"stanza body line longer than {COLUMNS} columns")
        try:
            self._body += b64decode(line)
        except ValueError as exc:
            raise HeaderError(f"malformed stanza body line {_show(line)}: {exc}") from exc
        if len(line) < COLUMNS:
            self.stanzas.append(Stanza(self._type, self._args, bytes(self._body)))
            self._body.clear()
            self._state = "stanza"

    def _end_line(self, line: bytes, start: int) -> None:
        if not line.startswith(b"--- "):
            raise HeaderError(f"malformed closing line {_show(line)}")
        try:
            mac = b64decode(line[4:])
        except ValueError as exc:
            raise HeaderError(f"malformed header MAC {_show(line)}: {exc}") from exc
        if len(mac) != MAC_SIZE:
            raise HeaderError(f"malformed header MAC {_show(line)}")
        if not self.stanzas:
            raise HeaderError("header has no recipient stanzas")
        self.mac = mac
        self.signed = bytes(self._buf[: start + 3])
        self._state = "done"
