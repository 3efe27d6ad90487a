"""The one place where compression, encryption and hashing meet.

Write side: source -> zstd -> age -> sha256 -> storage.put, as a chain of
threads joined by small bounded queues, so memory stays constant and zstd,
the AEAD and the upload overlap (all release the GIL). Read side: the reverse,
checking size and sha256 against the manifest and every AEAD tag.

A backup's zstd and age threads run at the job's ``cpu_priority`` (unset: the
driver's default): "low" (nice 10) lets the database and its dump tool go first
while compression keeps a share of a busy CPU; "idle" (SCHED_IDLE) takes only CPU
nobody else wants; "normal" competes at equal priority.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import sys
import threading
from dataclasses import dataclass
from typing import BinaryIO, Literal, Sequence, cast

import zstandard

from backupd import age, progress
from backupd.errors import Aborted, CryptoError, DriverError, IntegrityError, KeyMismatch
from backupd.storage import Readable

READ_CHUNK = 1 << 20
QUEUE_DEPTH = 4
ZSTD_JOB_SIZE = 4 << 20
_EOF = object()


@dataclass(frozen=True)
class EncodedStats:
    raw_size: int
    stored_size: int
    sha256: str


Priority = Literal["normal", "low", "idle"]
LOW_NICE = 10
IDLE_NICE = 19  # "idle" where SCHED_IDLE is refused


def lower_priority(priority: Priority) -> None:
    """Lower the calling thread: "low" to nice 10, "idle" to SCHED_IDLE (nice 19 where that is refused).

    Lowering one's own priority needs no privilege and cannot be undone without one,
    so only pipeline worker threads call this; threads they start (zstd's) inherit it.
    """
    if priority == "normal" or not sys.platform.startswith("linux"):
        return  # elsewhere these calls would act on the whole process, the dump tool's parent
    tid = threading.get_native_id()
    if priority == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
            return
        except (AttributeError, OSError):
            pass
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid),
                                                 LOW_NICE if priority == "low" else IDLE_NICE))


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class EncodingReader:
    """A readable stream of the encrypted object; ``stats`` once fully read.

    ``read()`` raises whatever failed upstream (the source, zstd, the AEAD), so the
    storage backend aborts the write and never commits a partial object.
    """

    def __init__(
        self,
        source: Readable,
        recipients: Sequence[age.X25519Recipient],
        level: int = 3,
        threads: int | None = None,
        cancel: threading.Event | None = None,
        priority: Priority = "normal",
    ) -> None:
        self._source = source
        self._priority = priority
        self._cancel = cancel or threading.Event()
        self._compressed: queue.Queue = queue.Queue(QUEUE_DEPTH)
        self._encrypted: queue.Queue = queue.Queue(QUEUE_DEPTH)
        self._recipients = list(recipients)
        workers = threads if threads is not None else max(0, min(os.cpu_count() or 1, 8))
        # Multi-threaded zstd buffers whole jobs per worker; 4 MiB jobs keep that small.
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=workers if workers > 1 else 0, job_size=ZSTD_JOB_SIZE if workers > 1 else 0
        )
        self._compressor = zstandard.ZstdCompressor(compression_params=params)
        self._raw_size = 0
        self._stored_size = 0
        self._hash = hashlib.sha256()
        self._buffer = memoryview(b"")
        self._done = False
        self._stats: EncodedStats | None = None
        self._threads = [
            threading.Thread(target=self._compress_loop, name="zstd", daemon=True),
            threading.Thread(target=self._encrypt_loop, name="age", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _put(self, q: queue.Queue, item: object) -> None:
        while True:
            if self._cancel.is_set():
                raise Aborted("pipeline cancelled")
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _get(self, q: queue.Queue) -> object:
        while True:
            if self._cancel.is_set():
                raise Aborted("pipeline cancelled")
            try:
                return q.get(timeout=0.2)
            except queue.Empty:
                continue

    def _compress_loop(self) -> None:
        try:
            lower_priority(self._priority)  # before zstd starts its workers: they inherit it
            zobj = self._compressor.compressobj()
            while chunk := self._source.read(READ_CHUNK):
                self._raw_size += len(chunk)
                self._put_pieces(zobj.compress(chunk))
            self._put_pieces(zobj.flush())
            self._put(self._compressed, _EOF)
        except BaseException as exc:  # forwarded to the consumer
            self._fail(self._compressed, exc)

    def _put_pieces(self, data: bytes) -> None:
        """Queue at most READ_CHUNK bytes per item, so queue depth bounds memory."""
        view = memoryview(data)
        for start in range(0, len(view), READ_CHUNK):
            self._put(self._compressed, view[start:start + READ_CHUNK])

    def _encrypt_loop(self) -> None:
        try:
            lower_priority(self._priority)
            encryptor = age.Encryptor(self._recipients)
            while True:
                item = self._get(self._compressed)
                if isinstance(item, _Failure):
                    self._put(self._encrypted, item)
                    return
                out = encryptor.finalize() if item is _EOF else encryptor.update(item)  # type: ignore[arg-type]
                if out:
                    self._hash.update(out)
                    self._stored_size += len(out)
                    self._put(self._encrypted, out)
                if item is _EOF:
                    self._put(self._encrypted, _EOF)
                    return
        except BaseException as exc:
            self._fail(self._encrypted, exc)

    def _fail(self, q: queue.Queue, exc: BaseException) -> None:
        if self._cancel.is_set():
            return
        try:
            self._put(q, _Failure(exc))
        except Aborted:
            pass

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 62
        parts: list[bytes] = []
        wanted = size
        while wanted > 0:
            if not self._buffer:
                if self._done:
                    break
                item = self._get(self._encrypted)
                if isinstance(item, _Failure):
                    self.close()
                    raise item.exc
                if item is _EOF:
                    self._done = True
                    self._stats = EncodedStats(self._raw_size, self._stored_size, self._hash.hexdigest())
                    break
                self._buffer = memoryview(item)  # type: ignore[arg-type]
            take = self._buffer[:wanted]
            parts.append(bytes(take))
            self._buffer = self._buffer[len(take):]
            wanted -= len(take)
        return b"".join(parts)

    @property
    def stats(self) -> EncodedStats:
        if self._stats is None:
            raise RuntimeError("stream not fully read")
        return self._stats

    def close(self) -> None:
        """Stop the worker threads (used when the consumer gives up)."""
        if not self._done:
            self._cancel.set()
        for thread in self._threads:
            thread.join(timeout=5)


def encode_bytes(data: bytes, recipients: Sequence[age.X25519Recipient], level: int = 3) -> bytes:
    """A whole small object at once: one zstd frame in one age file, as ``EncodingReader`` writes it.

    For logs of bounded size (a WAL segment): one-shot zstd avoids the streaming
    compressor's copies into its window buffer, about 15% of the CPU per segment.
    """
    encryptor = age.Encryptor(list(recipients))
    compressed = zstandard.ZstdCompressor(level=level).compress(data)
    return encryptor.update(compressed) + encryptor.finalize()


class _DecryptingReader:
    """Stored bytes -> (size, sha256 checked at EOF) -> age -> compressed bytes."""

    def __init__(self, stored: Readable, identities: Sequence[object], where: str,
                 expected_size: int | None, expected_sha256: str | None, key_file: str | None) -> None:
        self._stored = stored
        self._where = where
        self._key_file = key_file
        self._expected_size = expected_size
        self._expected_sha256 = expected_sha256
        self._decryptor = age.Decryptor(list(identities))  # type: ignore[arg-type]
        self._hash = hashlib.sha256()
        self._size = 0
        self._pending = bytearray()
        self._eof = False

    def _decrypt(self, data: bytes | None) -> bytes:
        try:
            return self._decryptor.update(data) if data is not None else self._decryptor.finalize()
        except age.NoIdentityMatch:
            key = f" in {self._key_file}" if self._key_file else ""
            raise KeyMismatch(f"{self._where}: no identity{key} can decrypt this object (wrong key?)") from None
        except age.AgeError as exc:
            raise CryptoError(f"{self._where}: decryption failed, object corrupt or truncated ({exc})") from None

    def _check(self) -> None:
        if self._expected_size is not None and self._size != self._expected_size:
            raise IntegrityError(f"{self._where}: stored size {self._size} differs from the manifest's {self._expected_size}")
        if self._expected_sha256 is not None and self._hash.hexdigest() != self._expected_sha256:
            raise IntegrityError(f"{self._where}: sha256 differs from the manifest's")

    def read(self, size: int = -1) -> bytes:
        while not self._pending and not self._eof:
            data = self._stored.read(READ_CHUNK)
            if data:
                self._hash.update(data)
                self._size += len(data)
                self._pending += self._decrypt(data)
            else:
                self._check()
                self._pending += self._decrypt(None)
                self._eof = True
        if size is None or size < 0 or size >= len(self._pending):
            out = bytes(self._pending)
            self._pending.clear()
            return out
        out = bytes(self._pending[:size])
        del self._pending[:size]
        return out

    def close(self) -> None:
        close = getattr(self._stored, "close", None)
        if close:
            close()


class DecodingReader:
    """Reads a stored object back to plaintext, proving it matches the manifest.

    Every 64 KiB chunk is authenticated before its plaintext is released; stored
    size and sha256 are checked at EOF, and so is the plaintext size. Output is
    bounded by the caller's read size, however well the data compressed.
    """

    def __init__(
        self,
        stored: Readable,
        identities: Sequence[object],
        *,
        where: str,
        expected_size: int | None = None,
        expected_sha256: str | None = None,
        expected_raw_size: int | None = None,
        key_file: str | None = None,
    ) -> None:
        self._where = where
        self._inner = _DecryptingReader(stored, identities, where, expected_size, expected_sha256, key_file)
        self._reader = zstandard.ZstdDecompressor().stream_reader(cast(BinaryIO, self._inner), read_size=READ_CHUNK)
        self._expected_raw_size = expected_raw_size
        progress.expect(expected_raw_size)
        self.raw_size = 0

    def read(self, size: int = -1) -> bytes:
        try:
            if size is None or size < 0:
                chunks = []
                while chunk := self.read(READ_CHUNK):
                    chunks.append(chunk)
                return b"".join(chunks)
            data = self._reader.read(size)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{self._where}: corrupt compressed data ({exc})") from None
        self.raw_size += len(data)
        progress.advance(len(data))
        if not data and size and self._expected_raw_size is not None and self.raw_size != self._expected_raw_size:
            raise IntegrityError(
                f"{self._where}: restored {self.raw_size} bytes, the manifest says {self._expected_raw_size}"
            )
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._inner.close()

    def __enter__(self) -> "DecodingReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CountingReader:
    """Wraps a source, counting bytes; refuses an empty stream at EOF."""

    def __init__(self, source: Readable, name: str, allow_empty: bool = False) -> None:
        self._source = source
        self._name = name
        self._allow_empty = allow_empty
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.size += len(data)
        progress.advance(len(data))
        if not data and self.size == 0 and not self._allow_empty:
            raise DriverError(f"stream {self._name!r} is empty: the dump produced no data")
        return data


def hash_stored(stream: Readable) -> tuple[int, str]:
    """Size and sha256 of stored bytes, streamed."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(READ_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


__all__ = ["EncodingReader", "DecodingReader", "CountingReader", "EncodedStats", "encode_bytes", "hash_stored"]
