"""backupd's exceptions. Only ``main()`` turns them into exit statuses.

Every error carries the exit status it stands for and, where one helps, a hint
telling the operator what to do next.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path
from typing import Iterator

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_VERIFY_BAD = 3
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C), as shells report 128 + 2


class BackupdError(Exception):
    """Root of every error backupd raises on purpose."""

    exit_code: int = EXIT_FAILURE
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return self.args[0] if self.args else type(self).__name__


class ConfigError(BackupdError):
    """The configuration file or the command line is wrong."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, errors: list[str] | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.errors = errors or []


class UsageError(ConfigError):
    """A command was called with arguments that cannot work."""


class PluginError(ConfigError):
    """A driver or storage plugin is unknown or cannot be loaded."""


class StorageError(BackupdError):
    """Storage failed in a way the caller cannot fix by retrying."""


class StorageUnavailable(StorageError):
    """Storage cannot be reached: network down, endpoint wrong, bucket missing."""


class ObjectNotFound(StorageError):
    """The named object does not exist."""


class ObjectExists(StorageError):
    """A write that must not overwrite found the name already taken."""


class ObjectChanged(StorageError):
    """A conditional replace (``Storage.replace``) found another version than the one it was based on."""


class ObjectLocked(StorageError):
    """Storage refused to delete an object still under an Object Lock retention.

    ``until`` is when the retention ends (``datetime.max`` for a legal hold), when known.
    """

    def __init__(self, message: str, *, until: dt.datetime | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.until = until


class CryptoError(BackupdError):
    """Encryption or decryption failed: wrong key, corrupt or truncated object."""


class IntegrityError(BackupdError):
    """Stored data does not match its manifest: the backup is bad."""

    exit_code = EXIT_VERIFY_BAD


class UntrustedObject(IntegrityError):
    """A manifest (or log object) no trusted key vouches for: unsigned, or badly signed.

    Refused by restore (exit 1); verify turns it into a failed report (exit 3)."""

    exit_code = EXIT_FAILURE


class BackupNotFound(BackupdError):
    """No backup with the given id (or none at all) for the job."""


class DriverError(BackupdError):
    """The native tool or the database failed during a backup or restore."""


class ArchiveGap(BackupdError):
    """Replay would need a log the archive lacks: the target (or the end of the archive) is past a gap."""


class LockHeld(BackupdError):
    """Another process holds the job's lock."""


class Aborted(BackupdError):
    """The operation was cancelled (signal, timeout) before it committed."""


class KeyMismatch(CryptoError):
    """No configured identity can open the object: the wrong key, not a bad backup."""


def read_secret(path: Path, what: str) -> bytes:
    """The bytes of a secret file the configuration names (an identity, a signing key, a password);
    ConfigError naming ``what`` and the file when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: file not found") from None
    except PermissionError:
        raise ConfigError(f"{what} {path}: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or type(exc).__name__}") from None


@contextlib.contextmanager
def naming(path: object) -> Iterator[None]:
    """OS errors inside the block name ``path`` when they name nothing (a write or fsync on an open file)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def from_os_error(exc: OSError) -> BackupdError:
    """An OS error on one of backupd's own files (state_dir, spool, a restore target) as a one-line error
    naming the path, exit 1: "disk full" or "permission denied" is the operator's to fix, not a bug."""
    where = exc.filename if exc.filename is not None else None
    what = exc.strerror or type(exc).__name__
    hints = {28: "free space on the file system that holds it (df -h)",
             13: "check the owner and mode of the path and the user backupd runs as",
             30: "the file system is read-only"}
    message = f"{where}: {what}" if where else what
    if exc.filename2:
        message += f" (and {exc.filename2})"
    return BackupdError(message, hint=hints.get(exc.errno or 0))
