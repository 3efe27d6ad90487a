"""Restoring: choose the backup, then let the driver write it out."""

from __future__ import annotations

from typing import BinaryIO, Callable, Sequence

import structlog

from backupd.context import JobContext
from backupd.driver import RestoreRequest
from backupd.errors import BackupNotFound
from backupd.logarchive import LogArchive
from backupd.manifest import Manifest
from backupd.repository import Repository

log = structlog.get_logger(__name__)


class RepositorySource:
    """A committed backup read back through the pipeline (the driver's BackupSource)."""

    def __init__(self, repo: Repository, manifest: Manifest, identities: Sequence[object], key_file: str | None) -> None:
        self.repo = repo
        self.manifest = manifest
        self._identities = identities
        self._key_file = key_file

    def open(self, name: str) -> BinaryIO:
        try:
            return self.repo.open_stream(self.manifest, name, self._identities, self._key_file)  # type: ignore[return-value]
        except KeyError:
            raise BackupNotFound(f"backup {self.manifest.backup_id} has no stream {name!r}") from None

    def logs(self, kind: str) -> LogArchive:
        return LogArchive(self.repo.storage, self.repo.job, kind, trusted=self.repo.trusted,  # type: ignore[arg-type]
                          allow_unsigned=self.repo.allow_unsigned)

    def open_log(self, kind: str, name: str) -> BinaryIO:
        return self.logs(kind).open(name, self._identities, self._key_file)  # type: ignore[return-value]


def run_restore(ctx: JobContext, request: RestoreRequest, backup_id: str | None = None,
                emit: Callable[[str], None] | None = None) -> list[str]:
    """Restore (or with ``dry_run`` only plan); return the lines to print, passing each to ``emit`` too.

    A dry run emits its plan, then raises what the real run would refuse (so it exits non-zero).
    """
    ctx.driver.check_to(request)
    if backup_id:  # only the named backup's manifest is read (its own error, if any)
        manifests = [ctx.repository.load_manifest(backup_id)]
    else:  # an unusable manifest is skipped (with a warning naming it)
        manifests = ctx.repository.manifests()
    manifest = ctx.repository.load_full(ctx.driver.choose_backup(manifests, request, backup_id))  # by key
    plan = ctx.driver.describe_restore(manifest, request)
    if request.dry_run:
        lines = ["plan (dry run, nothing touched):", *("  " + line for line in plan)]
        if emit is not None:
            for line in lines:
                emit(line)
        ctx.driver.check_target(manifest, request)
        return lines
    ctx.driver.check_target(manifest, request)
    source = RepositorySource(ctx.repository, manifest, ctx.identities, str(ctx.identity_file))
    with structlog.contextvars.bound_contextvars(job=ctx.name, backup_id=manifest.backup_id, stage="restore"):
        log.info("restore started", to=request.to)
        message = ctx.driver.restore(source, request)
        log.info("restore finished")
    if emit:
        emit(message)
    return [message]
