"""The storage interface: six methods moving opaque bytes.

A backend never sees plaintext and never interprets keys beyond using them as
names. Keys are relative, '/'-separated, with no leading '/' and no '..'
component; a backend maps them under its own root (a directory, a bucket prefix).

Error contract, for every method: a missing object raises ``ObjectNotFound``;
storage that cannot be reached (network, permissions, missing bucket) raises
``StorageUnavailable``; anything else a backend's library raises is converted
to ``StorageError`` at the boundary, with the original chained as ``__cause__``.
Callers never see botocore or OS exceptions. Storage that enforces a retention
(S3 Object Lock) raises ``ObjectLocked`` from ``delete`` while it holds the object.

Two optional methods give small objects (the per-job ``index.json``) a compare-and-swap:
``read_versioned`` returns an object's bytes with a token naming that version, and
``replace`` writes only while the object is still that version, raising ``ObjectChanged``
(nothing written) when another writer got there first. A backend without them raises
``ConditionalWritesUnsupported`` (a ``StorageError``); callers then treat the object as
read-only.
"""

from __future__ import annotations

import abc
import builtins
import datetime as dt
from dataclasses import dataclass
from typing import BinaryIO, Callable, ClassVar, Iterator, Mapping, Protocol, Union

from pydantic import BaseModel

from backupd.errors import StorageError


class ConditionalWritesUnsupported(StorageError):
    """The backend offers no ``read_versioned``/``replace`` (compare-and-swap)."""


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Versioned:
    """A small object's bytes and the token naming this version of it (for ``Storage.replace``)."""

    data: bytes
    version: str


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: dt.datetime | None = None
    #: User metadata given to ``put``; filled by ``stat`` (``list`` may leave it None).
    metadata: dict[str, str] | None = None
    #: Filled by ``stat`` on storage that enforces a retention (S3 Object Lock): the object
    #: cannot be deleted before then (``LOCKED_INDEFINITELY`` under a legal hold). None: deletable.
    locked_until: dt.datetime | None = None


#: ``put``'s metadata: a mapping, or (for backends with ``deferred_metadata``) a function returning one.
Metadata = Union[Mapping[str, str], Callable[[], Mapping[str, str]]]


def resolve_metadata(metadata: Metadata | None) -> Mapping[str, str] | None:
    """The mapping a ``put`` stores: called at most once, as late as the backend can."""
    return metadata() if callable(metadata) else metadata


#: ``ObjectInfo.locked_until`` of an object under a legal hold: no date ends it.
LOCKED_INDEFINITELY = dt.datetime.max.replace(tzinfo=dt.timezone.utc)


def check_key(key: str) -> str:
    """Refuse keys that could escape a backend's root or are not plain names."""
    if not key or key.startswith("/") or key.endswith("/"):
        raise StorageError(f"invalid storage key {key!r}")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\0" in key:
        raise StorageError(f"invalid storage key {key!r}")
    return key


class Storage(abc.ABC):
    """A place to keep objects: a directory, an S3 bucket, ..."""

    #: The backend's configuration keys (``[storage.NAME]``); unknown keys are errors.
    options_model: ClassVar[type[BaseModel]]

    #: Human-readable location for messages, e.g. ``s3://bucket/prefix/``.
    location: str = ""
    #: ``put`` accepts ``metadata`` as a function, called once the source is read to its end (a digest
    #: of the bytes streamed) or, where the backend must send metadata before that, when it must.
    deferred_metadata: bool = False

    @abc.abstractmethod
    def put(
        self,
        key: str,
        source: Readable,
        *,
        if_absent: bool = False,
        metadata: Metadata | None = None,
        retain_until: dt.datetime | None = None,
    ) -> ObjectInfo:
        """Store everything ``source.read()`` yields under ``key``.

        ``metadata`` (short ASCII keys and values, e.g. a plaintext digest) is
        stored with the object and returned by ``stat``.

        ``retain_until`` marks backup data (streams, manifests, logs): the
        retention policy guarantees to keep the object at least until then. A
        backend that can make objects undeletable (S3 with ``object_lock``)
        locks it until then or later; every other backend accepts and ignores
        it. Objects put without it (journals, pins, reports) are never locked.

        Reads the source in bounded chunks until it returns ``b""``. The object
        becomes visible under ``key`` only once complete; if reading the source
        or writing fails, nothing is left under ``key`` (and no partial upload
        on the server). With ``if_absent`` an existing object is never replaced:
        ``ObjectExists`` is raised instead.
        """

    @abc.abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A streaming reader of the object's bytes; the caller closes it."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""

    def list_after(self, prefix: str, start_after: str) -> Iterator[ObjectInfo]:
        """As ``list``, but only keys that sort after ``start_after``: what was added past a known point
        (the index's newest backup) at the cost of what is listed, not of everything under ``prefix``."""
        return (info for info in self.list(prefix) if info.key > start_after)

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size (and time) of one object."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error.

        Raises ``ObjectLocked`` (the object unchanged) while a retention holds it.
        """

    def can_lock(self) -> bool:
        """Whether this storage may hold objects under a retention (``ObjectInfo.locked_until``); when
        false, nobody needs to stat objects for locks."""
        return False

    def read_versioned(self, key: str, limit: int) -> Versioned:
        """The whole object (at most ``limit`` bytes, else ``StorageError``) and its version token, read
        together. ``ObjectNotFound`` when missing."""
        raise ConditionalWritesUnsupported(f"{self.location}: conditional writes are not supported")

    def replace(self, key: str, data: bytes, *, version: str | None) -> str:
        """Put ``data`` at ``key`` only while the object is the version ``version`` names (a token from
        ``read_versioned`` or an earlier ``replace``), or with None only while there is none; return the
        new version's token. ``ObjectChanged`` when it is another version (or gone): nothing is written."""
        raise ConditionalWritesUnsupported(f"{self.location}: conditional writes are not supported")

    def sweep(self, prefix: str, *, remove: bool = True) -> builtins.list[str]:
        """What interrupted writes left under ``prefix`` (removed unless ``remove`` is false).

        A ``put`` killed mid-way (SIGKILL, power loss) cannot clean up after
        itself: a temp file, an empty directory, an unfinished multipart upload.
        Complete objects are never touched. Call it only where no writer is at
        work under ``prefix`` (the job's lock is held). Returns one description
        each (a key or upload).
        """
        return []

    def close(self) -> None:
        """Release connections and files. Idempotent."""

    def __enter__(self) -> "Storage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
