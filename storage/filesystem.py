"""Local disk (or NFS) storage.

Writes go to a hidden temp file beside the target, are fsynced, then linked or
renamed into place and the directory fsynced: a name is only ever bound to a
complete object.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping

from pydantic import BaseModel, ConfigDict

from backupd.errors import ObjectChanged, ObjectExists, ObjectNotFound, StorageError, StorageUnavailable
from backupd.storage import Metadata, ObjectInfo, Readable, Storage, Versioned, check_key, resolve_metadata

CHUNK = 1 << 20
#: Writeback of a new object starts every this many bytes, so the closing fsync waits for little.
WRITEBACK_EVERY = 16 << 20
TEMP_PREFIX = ".tmp-"
META_PREFIX = ".meta-"


class FilesystemOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = "filesystem"
    path: Path


@contextlib.contextmanager
def _os_errors(what: str):
    """Turn OS errors into backupd's storage errors, naming the path."""
    try:
        yield
    except (ObjectNotFound, ObjectExists, StorageError):
        raise
    except FileNotFoundError as exc:
        raise ObjectNotFound(f"{what}: no such object") from exc
    except PermissionError as exc:
        raise StorageUnavailable(f"{what}: permission denied") from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StorageError(f"{what}: no space left on device") from exc
        raise StorageError(f"{what}: {exc.strerror or exc}") from exc


def _start_writeback(out: BinaryIO, start: int, end: int) -> int:
    """Ask the kernel to start writing [start, end) now (Linux sync_file_range, no waiting); return end."""
    sync_range = getattr(os, "sync_file_range", None)
    if sync_range is not None:
        out.flush()
        with contextlib.suppress(OSError):
            sync_range(out.fileno(), start, end - start, os.SYNC_FILE_RANGE_WRITE)  # type: ignore[attr-defined]
    return end


def _adopt(path: Path, directory: Path) -> None:
    """Run as root, give ``path`` the owner of the ``directory`` it goes in: a root command (``sudo backupd
    verify``) must not leave the repository's files (``index.json``, a report) unreadable to the OS user
    the daemon and archive_command run as. Nothing for other users, who can only create their own."""
    if os.geteuid() != 0:
        return
    owner = directory.stat()
    if (owner.st_uid, owner.st_gid) != (0, 0):
        os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)


def _make_parents(directory: Path) -> None:
    """``mkdir -p`` of an object's directory, each new directory owned as its parent (``_adopt``)."""
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue  # another writer made it
        _adopt(path, path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemStorage(Storage):
    options_model = FilesystemOptions
    deferred_metadata = True

    def __init__(self, options: FilesystemOptions | Path | str) -> None:
        if not isinstance(options, FilesystemOptions):
            options = FilesystemOptions(path=Path(options))
        self.root = options.path.expanduser().absolute()
        self.location = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _ensure_root(self) -> None:
        with _os_errors(str(self.root)):
            if not self.root.exists():
                self.root.mkdir(parents=True, exist_ok=True)
            elif not self.root.is_dir():
                raise StorageUnavailable(f"{self.root}: not a directory")

    def _meta_path(self, target: Path) -> Path:
        return target.parent / f"{META_PREFIX}{target.name}.json"

    def put(
        self,
        key: str,
        source: Readable,
        *,
        if_absent: bool = False,
        metadata: Metadata | None = None,
        retain_until: dt.datetime | None = None,  # a directory cannot lock files: ignored
    ) -> ObjectInfo:
        target = self._path(key)
        self._ensure_root()
        with _os_errors(str(target)):
            _make_parents(target.parent)
            tmp = target.parent / f"{TEMP_PREFIX}{target.name}.{uuid.uuid4().hex[:12]}"
            size = 0
            try:
                with open(tmp, "xb") as out:
                    _adopt(tmp, target.parent)
                    flushed = 0
                    while chunk := source.read(CHUNK):
                        out.write(chunk)
                        size += len(chunk)
                        if size - flushed >= WRITEBACK_EVERY:
                            flushed = _start_writeback(out, flushed, size)
                    out.flush()
                    os.fsync(out.fileno())
                metadata = resolve_metadata(metadata)
                if metadata is not None:
                    # Metadata goes in first: an object is never visible without it.
                    self._write_meta(target, metadata, if_absent)
                if if_absent:
                    try:
                        os.link(tmp, target)
                    except FileExistsError:
                        raise ObjectExists(f"{target}: already exists") from None
                    os.unlink(tmp)
                else:
                    os.replace(tmp, target)
                _fsync_dir(target.parent)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                self._tidy(target.parent)  # a failed first write leaves no empty backup directory
                raise
        return ObjectInfo(key=key, size=size, modified=dt.datetime.now(dt.timezone.utc),
                          metadata=dict(metadata) if metadata is not None else None)

    def _write_meta(self, target: Path, metadata: Mapping[str, str], if_absent: bool) -> None:
        meta = self._meta_path(target)
        if if_absent and target.exists():
            return  # the link below fails; keep the existing object's metadata
        tmp = meta.parent / f"{TEMP_PREFIX}{meta.name}.{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "x") as out:
                _adopt(tmp, meta.parent)
                json.dump(dict(metadata), out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, meta)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _read_meta(self, target: Path) -> dict[str, str]:
        try:
            return json.loads(self._meta_path(target).read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        with _os_errors(str(path)):
            return open(path, "rb")

    def read_versioned(self, key: str, limit: int) -> Versioned:
        path = self._path(key)
        with _os_errors(str(path)), open(path, "rb") as handle:
            data = handle.read(limit + 1)
            version = _version(os.fstat(handle.fileno()))  # the file read: puts replace files, never rewrite them
        if len(data) > limit:
            raise StorageError(f"{path}: larger than the limit of {limit} bytes; not read")
        return Versioned(data, version)

    def replace(self, key: str, data: bytes, *, version: str | None) -> str:
        """Under an exclusive lock of the object's directory (``flock``: local disks and NFSv4),
        compare the current file with ``version``, then rename the new one over it."""
        target = self._path(key)
        self._ensure_root()
        with _os_errors(str(target)):
            _make_parents(target.parent)
            directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(directory, fcntl.LOCK_EX)
                try:
                    current: str | None = _version(target.stat())
                except FileNotFoundError:
                    current = None
                if current != version:
                    raise ObjectChanged(f"{target}: changed since it was read (another writer)")
                tmp = target.parent / f"{TEMP_PREFIX}{target.name}.{uuid.uuid4().hex[:12]}"
                try:
                    with open(tmp, "xb") as out:
                        _adopt(tmp, target.parent)
                        out.write(data)
                        out.flush()
                        os.fsync(out.fileno())
                        written = _version(os.fstat(out.fileno()))
                    os.replace(tmp, target)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                os.fsync(directory)
                return written
            finally:
                os.close(directory)  # releases the lock

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._ensure_root()
        # Walk only the deepest directory the prefix names, then filter by prefix.
        base_dir = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not base_dir.is_dir():
            return iter(())
        found: list[ObjectInfo] = []
        root = str(self.root) + os.sep
        with _os_errors(str(base_dir)):
            for dirpath, dirnames, filenames in os.walk(base_dir):  # plain strings: 100k keys, no pathlib
                relative = dirpath[len(root):].replace(os.sep, "/") if dirpath.startswith(root) else ""
                # only the folders that can hold a key with the prefix (a WAL folder, not its timeline's others)
                parent = f"{relative}/" if relative else ""
                dirnames[:] = sorted(d for d in dirnames
                                     if f"{parent}{d}/".startswith(prefix) or prefix.startswith(f"{parent}{d}/"))
                for name in filenames:
                    if name.startswith((TEMP_PREFIX, META_PREFIX)):
                        continue
                    key = f"{relative}/{name}" if relative else name
                    if not key.startswith(prefix):
                        continue
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue  # deleted while listing
                    found.append(ObjectInfo(key, st.st_size, _mtime(st.st_mtime)))
        found.sort(key=lambda info: info.key)
        return iter(found)

    def list_after(self, prefix: str, start_after: str) -> Iterator[ObjectInfo]:
        """Reads the prefix's directory, then walks only the subdirectories that can hold later keys, one at a
        time as the keys are read (a reader that stops at the first key walks one)."""
        if not prefix.endswith("/"):
            return super().list_after(prefix, start_after)
        return self._list_after(prefix, start_after)

    def _list_after(self, prefix: str, start_after: str) -> Iterator[ObjectInfo]:
        base_dir = self.root / prefix.rstrip("/")
        with _os_errors(str(base_dir)):
            try:
                names = os.listdir(base_dir)
            except FileNotFoundError:
                return
            # only children whose keys can sort after ``start_after``: a folder wholly after it, or holding it
            later = [(name, os.path.join(base_dir, name)) for name in names
                     if prefix + name + "/\U0010ffff" > start_after]
            # in key order: a folder's keys all begin with its name and "/"
            children = sorted(((name + "/" if os.path.isdir(path) and not os.path.islink(path) else name), path)
                              for name, path in later)
        for name, path in children:
            key = prefix + name
            if name.endswith("/"):
                yield from self._list_after(key, start_after)
            elif key > start_after and not name.startswith((TEMP_PREFIX, META_PREFIX)):
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue  # deleted while listing
                yield ObjectInfo(key, st.st_size, _mtime(st.st_mtime))

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        with _os_errors(str(path)):
            st = path.stat()
        return ObjectInfo(key, st.st_size, _mtime(st.st_mtime), self._read_meta(path))

    def delete(self, key: str) -> None:
        path = self._path(key)
        with _os_errors(str(path)):
            try:
                path.unlink()
            except FileNotFoundError:
                return
            with contextlib.suppress(FileNotFoundError):
                self._meta_path(path).unlink()
            self._tidy(path.parent)

    def _tidy(self, parent: Path) -> None:
        """Remove empty directories from ``parent`` up to the root, so listings stay small."""
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


    def sweep(self, prefix: str, *, remove: bool = True) -> builtins.list[str]:
        base_dir = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        found: builtins.list[str] = []
        if not base_dir.is_dir():
            return found
        with _os_errors(str(base_dir)):
            for dirpath, dirnames, filenames in os.walk(base_dir, topdown=False):
                directory = Path(dirpath)
                for name in filenames:
                    full = directory / name
                    key = full.relative_to(self.root).as_posix()
                    if name.startswith(TEMP_PREFIX) and key.startswith(prefix):
                        found.append(key)
                        if remove:
                            with contextlib.suppress(FileNotFoundError):
                                full.unlink()
                if directory != base_dir and directory.relative_to(self.root).as_posix().startswith(prefix.rstrip("/")):
                    try:
                        empty = not any(directory.iterdir())
                    except FileNotFoundError:
                        continue
                    if empty:
                        found.append(directory.relative_to(self.root).as_posix() + "/")
                        if remove:
                            with contextlib.suppress(OSError):
                                directory.rmdir()
        return found


def _version(st: os.stat_result) -> str:
    """A file's version token: a put or replace always makes a new file (a new inode)."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def _mtime(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)
