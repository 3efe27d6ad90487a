"""The age payload: STREAM with ChaCha20-Poly1305 over 64 KiB chunks.

Chunk nonces are an 11-byte big-endian counter and a flag byte, 1 on the final
chunk only. The final chunk may be short, and is empty only in an empty payload."""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from backupd.age.errors import PayloadError
from backupd.age.header import hkdf

NONCE_SIZE = 16
CHUNK_SIZE = 64 * 1024
TAG_SIZE = 16
SEALED_CHUNK_SIZE = CHUNK_SIZE + TAG_SIZE

Bytes = bytes | bytearray | memoryview


def payload_key(file_key: bytes, nonce: bytes) -> bytes:
    return hkdf(file_key, nonce, b"payload")


class StreamSealer:
    """Holds back up to one chunk: the last full chunk may turn out to be the final one."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0
        self._buf = bytearray()

    def _seal(self, chunk: Bytes, last: bool) -> bytes:
        nonce = self._counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")
        self._counter += 1
        return self._aead.encrypt(nonce, chunk, None)

    def update(self, data: Bytes, out: list[bytes]) -> None:
        view = memoryview(data)
        size, pos = len(view), 0
        buf = self._buf
        if buf:
            pos = min(CHUNK_SIZE - len(buf), size)
            buf += view[:pos]
            if pos == size:
                return
            out.append(self._seal(buf, last=False))
            buf.clear()
        while size - pos > CHUNK_SIZE:
            out.append(self._seal(view[pos : pos + CHUNK_SIZE], last=False))
            pos += CHUNK_SIZE
        buf += view[pos:]

    def finalize(self, out: list[bytes]) -> None:
        out.append(self._seal(self._buf, last=True))
        self._buf.clear()


class StreamOpener:
    """Releases each chunk once authenticated. A full chunk at the end of the data
    seen so far is first tried as a non-final chunk; if that fails it is held
    until the input ends (final chunk) or continues (error after release)."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0
        self._buf = bytearray()
        self._held = False
        self._done = False

    def _open(self, chunk: Bytes, last: bool) -> bytes | None:
        nonce = self._counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")
        try:
            return self._aead.decrypt(nonce, chunk, None)
        except InvalidTag:
            return None

    def _corrupt(self) -> PayloadError:
        return PayloadError(f"payload chunk {self._counter} failed authentication: corrupt or tampered file")

    def _followed(self, chunk: Bytes, out: list[bytes]) -> None:
        """A full chunk with more data after it."""
        plain = None if self._held else self._open(chunk, last=False)
        self._held = False
        if plain is None:
            plain = self._open(chunk, last=True)
            if plain is None:
                raise self._corrupt()
            out.append(plain)
            self._done = True
            raise PayloadError("trailing data after the final payload chunk")
        out.append(plain)
        self._counter += 1

    def _hold(self, out: list[bytes]) -> None:
        """self._buf holds exactly one full chunk and nothing follows yet."""
        if self._held:
            return
        plain = self._open(self._buf, last=False)
        if plain is None:
            self._held = True
            return
        out.append(plain)
        self._counter += 1
        self._buf.clear()

    def update(self, data: Bytes, out: list[bytes]) -> None:
        view = memoryview(data)
        size, pos = len(view), 0
        if self._done:
            if size:
                raise PayloadError("trailing data after the final payload chunk")
            return
        buf = self._buf
        if buf:
            pos = min(SEALED_CHUNK_SIZE - len(buf), size)
            buf += view[:pos]
            if len(buf) < SEALED_CHUNK_SIZE:
                return
            if pos == size:
                self._hold(out)
                return
            self._followed(buf, out)
            buf.clear()
        while size - pos > SEALED_CHUNK_SIZE:
            self._followed(view[pos : pos + SEALED_CHUNK_SIZE], out)
            pos += SEALED_CHUNK_SIZE
        buf += view[pos:]
        if len(buf) == SEALED_CHUNK_SIZE:
            self._hold(out)

    def finalize(self, out: list[bytes]) -> None:
        buf = self._buf
        if self._done:
            return
        if not buf:
            raise PayloadError("truncated payload: the final chunk is missing")
        if len(buf) < TAG_SIZE:
            raise PayloadError("truncated payload: the last chunk is too short")
        if len(buf) == TAG_SIZE and self._counter:
            raise PayloadError("the final payload chunk is empty")
        plain = self._open(buf, last=True)
        if plain is None:
            raise self._corrupt()
        out.append(plain)
        buf.clear()
        self._done = True
