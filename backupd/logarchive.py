"""Continuous log objects for PITR: PostgreSQL WAL, MySQL binlogs, MongoDB oplog slices.

Layout (DESIGN.md; the keys come from ``backupd.repository.Layout``, the folders from the naming
the driver describes, ``backupd.lognaming``)::

    <job>/wal/<timeline>/<segment[0:16]>/<segment>.zst.age   256 segments a folder
    <job>/wal/<timeline>/<file>.history|.backup.zst.age      beside them
    <job>/binlog/<server>/<file>.zst.age
    <job>/oplog/<from_ts>-<to_ts>.bson.zst.age

A log is known by its name (``00000001/000000010000000000000003``), whatever folder holds it.
Repositories written before the folders (``<job>/wal/<timeline>/<segment>.zst.age``) stay
readable: an object not found where it goes now is looked for there, until ``backupd migrate``
has moved them all and written ``Layout.log_layout_key``.

Each object is an age file wrapping a zstd frame, like every backup object. Its
plaintext sha256 and size travel as storage metadata, so a host holding only
public keys can still tell "already archived, same bytes" (success) from "same
name, different bytes" (refused, never overwritten).

With a signing key, every pushed object (partial ones too, re-signed each time they are
replaced) gets ``<key>.sig`` beside it, put first: an SSH signature over its kind, name and
plaintext sha256 (``backupd.signing.log_message``), so it stays valid when the object moves.
With trusted keys, ``open`` refuses an object whose signature is missing or bad before reading
it, and the plaintext's sha256 is checked against the signed one at its end (UntrustedObject),
so ``fetch_to`` never leaves it in place.
"""

from __future__ import annotations

import builtins
import dataclasses
import contextlib
import datetime as dt
import hashlib
import io
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterable, Iterator, Literal, Sequence

import structlog

from backupd import lognaming, signing, sshsig
from backupd.errors import BackupdError, ObjectExists, ObjectNotFound, UntrustedObject
from backupd.pipeline import READ_CHUNK, DecodingReader, EncodingReader, encode_bytes
from backupd.repository import Layout
from backupd.storage import ObjectInfo, Storage

if TYPE_CHECKING:
    from backupd.vouched import Vouched

log = structlog.get_logger(__name__)

Kind = Literal["wal", "binlog", "oplog"]
#: Logs up to this size (a default WAL segment) are encoded in memory at once; larger ones stream.
ONE_SHOT_MAX = 16 << 20
#: How often a long-lived archive (the daemon's pusher) looks again whether a migration emptied the older layout.
LEGACY_RECHECK = 300.0


class LogConflict(BackupdError):
    """A log with this name is archived with different content."""


def conflict(key: str, archived_sha256: str | None, sha256: str) -> LogConflict:
    """The error for other bytes under an archived log's name (never overwritten)."""
    return LogConflict(
        f"{key}: already archived with different content (sha256 {(archived_sha256 or 'unknown')[:12]}..., "
        f"this file {sha256[:12]}...); refusing to overwrite",
        hint="two servers may be archiving into the same job; check archive_command and the job's storage",
    )


@dataclass(frozen=True)
class LogObject:
    name: str  # relative to the kind's directory, without the suffix: "00000001/000000010000000000000003"
    key: str
    stored_size: int
    raw_size: int | None = None
    sha256: str | None = None
    modified: dt.datetime | None = None  # when it arrived in storage
    #: what the listing showed of its signature object ("size:time"); None when the listing had none
    signature: str | None = None


@dataclass(frozen=True)
class PushResult:
    name: str
    status: Literal["stored", "identical", "replaced"]
    raw_size: int
    stored_size: int
    sha256: str


def newest_of(objects: Iterable[LogObject]) -> LogObject | None:
    """The log stored last (newest modification time) of ``objects``; None when there are none."""
    epoch = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    return max(objects, key=lambda obj: obj.modified or epoch, default=None)


def file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class _Digesting:
    """A log file as the pipeline reads it, hashed on the way; its digest as the object's metadata.

    Storage asks for the metadata once the file is read to its end, so one read
    both hashes and uploads; a backend that needs it sooner (an S3 multipart
    upload) gets it from a separate pass over the file.
    """

    def __init__(self, handle: BinaryIO, path: Path, known: tuple[int, str] | None) -> None:
        self._handle = handle
        self._path = path
        self._known = known
        self._hash = hashlib.sha256() if known is None else None
        self._size = 0
        self._ended = False

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        if self._hash is not None:
            self._hash.update(data)
        self._size += len(data)
        self._ended = not data
        return data

    def digest(self) -> tuple[int, str]:
        if self._known is None:
            self._known = (self._size, self._hash.hexdigest()) if self._ended else file_digest(self._path)  # type: ignore[union-attr]
        return self._known

    def metadata(self) -> dict[str, str]:
        raw_size, sha256 = self.digest()
        return {"sha256": sha256, "raw-size": str(raw_size)}


class _CheckedReader(DecodingReader):
    """A signed log object's plaintext; at its end, UntrustedObject unless its sha256 is the signed one."""

    def __init__(self, stored: BinaryIO, identities: Sequence[object], *, signed_sha256: str, where: str,
                 expected_size: int | None, expected_raw_size: int | None, key_file: str | None) -> None:
        super().__init__(stored, identities, where=where, expected_size=expected_size,
                         expected_raw_size=expected_raw_size, key_file=key_file)
        self._signed_sha256 = signed_sha256
        self._hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(READ_CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        data = super().read(size)
        self._hash.update(data)
        if not data and size and self._hash.hexdigest() != self._signed_sha256:
            raise UntrustedObject(f"{self._where}: its content does not match its signature (sha256 "
                                  f"{self._hash.hexdigest()[:12]}..., signed {self._signed_sha256[:12]}...)",
                                  hint="the object was replaced after it was signed; it is not replayed")
        return data


class LogArchive:
    def __init__(self, storage: Storage, job: str, kind: Kind, recipients: Sequence[object] = (), level: int = 3,
                 *, retain_for: dt.timedelta | None = None, signing_key_file: Path | None = None,
                 trusted: Sequence[sshsig.PublicKey] = (), allow_unsigned: bool = False) -> None:
        """``signing_key_file``: pushed objects are signed with it (loaded on first push).
        ``trusted``: when not empty (``Settings.trusted_keys(job)``), ``open`` reads only objects
        one of these keys signed; ``allow_unsigned`` lets unsigned ones through with a warning,
        never badly signed ones (``restore --allow-unsigned``)."""
        self.storage = storage
        self.job = job
        self.kind = kind
        self.layout = Layout(job)
        self.recipients = list(recipients)
        self.level = level
        #: How long the retention policy guarantees to keep a new log (``retention.guaranteed_keep``).
        self.retain_for = retain_for
        self.signing_key_file = signing_key_file
        self.trusted = tuple(trusted)
        self.allow_unsigned = allow_unsigned
        self._signing_key: sshsig.SigningKey | None = None
        self._legacy: bool | None = None
        self._legacy_checked = 0.0
        #: whole listings shared by the archives of one command (``JobContext.one_listing``), by kind
        self.listings: dict[str, list[LogObject]] | None = None

    @property
    def signing_key(self) -> sshsig.SigningKey | None:
        if self._signing_key is None and self.signing_key_file is not None:
            self._signing_key = sshsig.load_private_key(self.signing_key_file)
        return self._signing_key

    @property
    def prefix(self) -> str:
        return self.layout.log_prefix(self.kind)

    def key(self, name: str) -> str:
        return self.layout.log_key(self.kind, name)

    def legacy_key(self, name: str) -> str | None:
        """Where the layout before folders kept ``name``, while objects may be left there; else None."""
        legacy = self.layout.legacy_log_key(self.kind, name)
        return legacy if legacy is not None and self.legacy_possible() else None

    def legacy_possible(self) -> bool:
        """Whether objects may be left in the layout before folders (until ``backupd migrate`` says none are)."""
        if self._legacy is None or (self._legacy and time.monotonic() - self._legacy_checked > LEGACY_RECHECK):
            self._legacy_checked = time.monotonic()
            try:
                self.storage.stat(self.layout.log_layout_key(self.kind))
                self._legacy = False
            except ObjectNotFound:
                self._legacy = True
        return self._legacy

    def _find(self, name: str) -> ObjectInfo:
        """The stored object of ``name`` (with metadata), where it goes now or else in the older layout."""
        try:
            return self.storage.stat(self.key(name))
        except ObjectNotFound:
            legacy = self.legacy_key(name)
            if legacy is None:
                raise
            try:
                return self.storage.stat(legacy)
            except ObjectNotFound:
                raise ObjectNotFound(f"{self.key(name)}: not found") from None

    def stat(self, name: str) -> LogObject:
        return self._log_object(self._find(name), name)

    def exists(self, name: str) -> bool:
        try:
            self._find(name)
            return True
        except ObjectNotFound:
            return False

    def push_file(self, name: str, path: Path, *, replace: bool = False, threads: int | None = 0,
                  digest: tuple[int, str] | None = None) -> PushResult:
        """Archive a local file; return only once it is durable in storage.

        Pushing the same bytes again succeeds (status "identical"); other bytes
        under an archived name raise LogConflict unless ``replace`` (used for
        partial objects of a log still being written). ``digest`` is the file's
        (size, sha256) when the caller has just computed it; otherwise, where the
        storage takes metadata late, it is computed from the bytes as they stream.

        A complete log is put with ``retain_until`` (now + ``retain_for``) so
        storage with Object Lock locks it; a partial one is replaced and
        deleted as the log grows, and is never locked.
        """
        legacy = self.legacy_key(name)
        if legacy is not None and not replace:
            known = self._in_legacy(name, legacy, path, digest)
            if known is not None:
                return known
        result = self._push_file(name, path, replace, threads, digest)
        if legacy is not None and replace:  # the newer copy is where it goes now: the older layout's goes
            self.storage.delete(legacy)
            self.storage.delete(signing.signature_key(legacy))
        return result

    def _push_file(self, name: str, path: Path, replace: bool, threads: int | None,
                   digest: tuple[int, str] | None) -> PushResult:
        key = self.key(name)
        retention: dict[str, dt.datetime] = {}
        if self.retain_for is not None and not replace:
            retention = {"retain_until": dt.datetime.now(dt.timezone.utc) + self.retain_for}
        if os.stat(path).st_size <= ONE_SHOT_MAX:
            return self._push_small(name, path, replace, digest, retention)
        if digest is None and (self.signing_key is not None or not self.storage.deferred_metadata):
            digest = file_digest(path)
        if self.signing_key is not None:
            assert digest is not None
            signing.sign_log(self.storage, key, self.kind, name, digest[1], self.signing_key, replace=replace,
                             **retention)
        with open(path, "rb") as handle:
            source = _Digesting(handle, path, digest)
            reader = EncodingReader(source, self.recipients, self.level, threads=threads)  # type: ignore[arg-type]
            try:
                info = self.storage.put(key, reader, if_absent=not replace, metadata=source.metadata,
                                        **retention)
            except ObjectExists:
                return self._existing(name, key, *source.digest())
            finally:
                reader.close()
        raw_size, sha256 = source.digest()
        if reader.stats.raw_size != raw_size:
            raise BackupdError(f"{path}: changed while being archived ({raw_size} bytes hashed, "
                               f"{reader.stats.raw_size} sent)")
        return PushResult(name, "replaced" if replace else "stored", raw_size, info.size, sha256)

    def _push_small(self, name: str, path: Path, replace: bool, digest: tuple[int, str] | None,
                    retention: dict[str, dt.datetime]) -> PushResult:
        data = path.read_bytes()
        raw_size, sha256 = len(data), hashlib.sha256(data).hexdigest()
        if digest is not None and digest != (raw_size, sha256):
            raise BackupdError(f"{path}: changed while being archived")
        key = self.key(name)
        if self.signing_key is not None:
            signing.sign_log(self.storage, key, self.kind, name, sha256, self.signing_key, replace=replace,
                             **retention)
        body = encode_bytes(data, self.recipients, self.level)  # type: ignore[arg-type]
        try:
            info = self.storage.put(key, io.BytesIO(body), if_absent=not replace,
                                    metadata={"sha256": sha256, "raw-size": str(raw_size)}, **retention)
        except ObjectExists:
            return self._existing(name, key, raw_size, sha256)
        return PushResult(name, "replaced" if replace else "stored", raw_size, info.size, sha256)

    def _in_legacy(self, name: str, legacy: str, path: Path, digest: tuple[int, str] | None) -> PushResult | None:
        """A push of a log the older layout holds: "identical" or a conflict, as if it were where it goes now."""
        try:
            self.storage.stat(legacy)
        except ObjectNotFound:
            return None
        raw_size, sha256 = digest if digest is not None else file_digest(path)
        return self._existing(name, legacy, raw_size, sha256)

    def _existing(self, name: str, key: str, raw_size: int, sha256: str) -> PushResult:
        """Another push got there first: the same bytes are success, others a conflict."""
        info = self.storage.stat(key)
        existing = info.metadata or {}
        if existing.get("sha256") == sha256:
            return PushResult(name, "identical", raw_size, info.size, sha256)
        raise conflict(key, existing.get("sha256"), sha256)

    def open(self, name: str, identities: Sequence[object], key_file: str | None = None) -> DecodingReader:
        """The plaintext of an archived log; with trusted keys, only a signed one (UntrustedObject otherwise)."""
        info = self._find(name)
        key = info.key
        raw = (info.metadata or {}).get("raw-size")
        expected_raw_size = int(raw) if raw and raw.isdigit() else None
        sha256 = (info.metadata or {}).get("sha256")
        legacy = self.layout.legacy_log_key(self.kind, name)
        try:
            if self.trusted:
                signing.check_log(self.storage, key, self.kind, name, sha256, self.trusted,
                                  legacy_keys=[legacy] if legacy is not None else [])
        except signing.Unsigned as exc:
            if not self.allow_unsigned:
                raise UntrustedObject(f"log {key} of job {self.job} is not trusted: {exc}",
                                      hint="only log objects signed by a key in trusted_keys are replayed; "
                                           "`restore --allow-unsigned` reads logs from before signing") from None
            log.warning("replaying an UNSIGNED log object (--allow-unsigned)", key=key)
        except sshsig.SignatureError as exc:
            raise UntrustedObject(f"log {key} of job {self.job} is not trusted: {exc}",
                                  hint="only log objects signed by a key in trusted_keys are replayed") from None
        else:
            if self.trusted:
                assert sha256 is not None
                return _CheckedReader(self.storage.open(key), identities, where=key, expected_size=info.size,
                                      expected_raw_size=expected_raw_size, key_file=key_file,
                                      signed_sha256=sha256)
        return DecodingReader(self.storage.open(key), identities, where=key, expected_size=info.size,
                              expected_raw_size=expected_raw_size, key_file=key_file)

    def fetch_to(self, name: str, dest: Path, identities: Sequence[object], key_file: str | None = None) -> int:
        """Decrypt into ``dest`` atomically (temp file + rename); return the byte count."""
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.part"
        size = 0
        try:
            with self.open(name, identities, key_file) as reader, open(tmp, "wb") as out:
                while chunk := reader.read(READ_CHUNK):
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return size

    def list(self, under: str = "", *, with_metadata: bool = False) -> list[LogObject]:
        """Archived logs whose name starts with ``under``, in name order, from either layout (where both hold
        a name, the object where it goes now).

        ``under`` is a directory, a start of a file name no longer than its folder (then only that
        folder is listed), or a whole name (``Layout.log_list_prefixes``)."""
        if self.listings is not None and not with_metadata:
            if self.kind not in self.listings:
                self.listings[self.kind] = self._list("", False)
            return [obj for obj in self.listings[self.kind] if obj.name.startswith(under)]
        return self._list(under, with_metadata)

    def _list(self, under: str, with_metadata: bool) -> "builtins.list[LogObject]":
        found: dict[str, ObjectInfo] = {}
        signatures: dict[str, ObjectInfo] = {}
        for prefix in self.layout.log_list_prefixes(self.kind, under):
            for info in self.storage.list(prefix):
                if info.key.endswith(".sig"):
                    signatures[info.key[:-len(".sig")]] = info
                    continue
                name = self.layout.log_name(self.kind, info.key)
                if name is None or not name.startswith(under):
                    continue
                if name not in found or info.key == self.key(name):
                    found[name] = info
        objects = []
        for name in sorted(found):
            info = self.storage.stat(found[name].key) if with_metadata else found[name]
            signature = signatures.get(info.key)
            objects.append(dataclasses.replace(
                self._log_object(info, name),
                signature=None if signature is None else f"{signature.size}:{signature.modified}"))
        return objects

    def stored_after(self, directory: str, folder: str) -> Iterator[LogObject]:
        """The logs of ``directory`` stored past its folder ``folder`` (in either layout), in key order, from one
        listing read only as far as the caller reads: where an archive resumes after a gap of whole folders."""
        prefix = self.layout.log_prefix(self.kind) + directory + "/"
        for info in self.storage.list_after(prefix, f"{prefix}{folder}/\U0010ffff"):
            name = self.layout.log_name(self.kind, info.key)
            if name is not None:
                yield self._log_object(info, name)

    def newest_stored(self) -> LogObject | None:
        """The log stored last (newest modification time); inside ``one_listing`` found once per listing, not
        once per backup that asks (``Driver.log_reach``)."""
        if self.listings is None:
            return newest_of(self.list())
        memo = f"{self.kind}\0newest"
        if memo not in self.listings:
            newest = newest_of(self.list())
            self.listings[memo] = [newest] if newest is not None else []
        return next(iter(self.listings[memo]), None)

    def list_before(self, bound: str) -> "builtins.list[LogObject]":
        """Archived logs whose name sorts before ``bound``, in name order, from either layout: one listing of
        the archive read only until it passes the folder ``bound`` lies in (keys sort as names do, folder by
        folder, in both layouts), so what it costs is what lies before ``bound``, not the whole archive.
        Where keys do not sort that way (names with and without a directory), it stops early: it may miss
        logs, never list one past ``bound``."""
        naming = lognaming.naming(self.kind)

        def place(name: str) -> tuple[str, str]:
            directory, file = naming.split(name)
            return directory, naming.folder(file) or file

        limit = place(bound)
        found: dict[str, ObjectInfo] = {}
        for info in self.storage.list(self.prefix):
            name = self.layout.log_name(self.kind, info.key)
            if name is None:
                continue
            if place(name) > limit:
                break
            if name < bound and (name not in found or info.key == self.key(name)):
                found[name] = info
        return [self._log_object(found[name], name) for name in sorted(found)]

    def list_from(self, first: str) -> "builtins.list[LogObject]":
        """Archived logs whose name sorts at or after ``first``, in name order, from either layout: listed from
        the folder ``first`` lies in on (``Storage.list_after``; keys sort as names do, folder by folder, as
        for ``list_before``), so what it costs is what lies from ``first`` on, not the whole archive."""
        naming = lognaming.naming(self.kind)
        directory, file = naming.split(first)
        folder = naming.folder(file)
        # in the older layout a key is the prefix, the name, a suffix; now the name's folder comes first
        start = self.prefix + "/".join(part for part in (directory, folder) if part) if folder else self.prefix + first
        if self.legacy_possible():
            start = min(start, self.prefix + first)
        found: dict[str, ObjectInfo] = {}
        for info in self.storage.list_after(self.prefix, start):
            name = self.layout.log_name(self.kind, info.key)
            if name is not None and name >= first and (name not in found or info.key == self.key(name)):
                found[name] = info
        return [self._log_object(found[name], name) for name in sorted(found)]

    def untrusted(self, vouched: Vouched | None = None) -> Iterator[str]:
        """With trusted keys, a line naming each archived log whose signature does not vouch for its name and
        recorded sha256 (unsigned, moved to another name, another key, or replaced with other metadata). The
        content is not read: ``open`` checks it against the signed sha256 when the log is replayed.
        ``vouched``: logs checked by an earlier verification and unchanged since are skipped (``backupd.vouched``)."""
        if not self.trusted:
            return
        listed = iter(self.list())
        for obj in vouched.unchecked(listed) if vouched is not None else listed:
            problem = self.signature_problem(obj.key, obj.name)
            if problem is not None:
                yield f"log {obj.key} of job {self.job} is not trusted: {problem}"
            elif vouched is not None:
                vouched.remember(obj)

    def signature_problem(self, key: str, name: str) -> str | None:
        """Why the signature of one listed log does not vouch for it; None when it does (or it is gone)."""
        problem = None
        legacy = self.layout.legacy_log_key(self.kind, name)
        for _ in range(2):  # a partial log is re-signed just before it is replaced: look a second time
            try:
                sha256 = (self.storage.stat(key).metadata or {}).get("sha256")
                signing.check_log(self.storage, key, self.kind, name, sha256, self.trusted,
                                  legacy_keys=[legacy] if legacy is not None else [])
                return None
            except ObjectNotFound:
                return None  # pruned, or a partial log completed, since the listing
            except sshsig.SignatureError as exc:
                problem = str(exc)
        return problem

    def iter_names(self, under: str = "") -> Iterator[str]:
        for obj in self.list(under):
            yield obj.name

    def delete(self, name: str) -> None:
        """Remove the object, then its signature (a missing one is not an error), in either layout."""
        for key in (self.key(name), self.legacy_key(name)):
            if key is not None:
                self.storage.delete(key)
                self.storage.delete(signing.signature_key(key))
        if self.listings is not None:
            self.listings.pop(self.kind, None)
            self.listings.pop(f"{self.kind}\0newest", None)

    @staticmethod
    def _log_object(info: ObjectInfo, name: str) -> LogObject:
        meta = info.metadata or {}
        raw = meta.get("raw-size")
        return LogObject(name, info.key, info.size, int(raw) if raw and raw.isdigit() else None, meta.get("sha256"),
                         info.modified)
