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

    def __init__(self, repo: Repository, manifest: Manifest, identities: Sequence[object], key_file: str | None,
                 chain: list[Manifest] | None = None) -> None:
        """``chain``: ``repo.chain(manifest)`` when the caller resolved it already; else read on first use."""
        self.repo = repo
        self.manifest = manifest
        self._identities = identities
        self._key_file = key_file
        self._chain = chain

    @property
    def chain(self) -> list[Manifest]:
        if self._chain is None:
            self._chain = self.repo.chain(self.manifest)
        return self._chain

    def open(self, name: str) -> BinaryIO:
        return self._open(self.manifest, name)

    def open_from(self, backup_id: str, name: str) -> BinaryIO:
        for manifest in self.chain:
            if manifest.backup_id == backup_id:
                return self._open(manifest, name)
        raise BackupNotFound(f"backup {backup_id} is not in the chain of backup {self.manifest.backup_id}")

    def _open(self, manifest: Manifest, name: str) -> BinaryIO:
        try:
            return self.repo.open_stream(manifest, name, self._identities, self._key_file)  # type: ignore[return-value]
        except KeyError:
            raise BackupNotFound(f"backup {manifest.backup_id} has no stream {name!r}") from None

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
    manifest = ctx.driver.choose_backup(manifests, request, backup_id)
    chain = ctx.repository.chain(manifest)  # a missing parent refuses before anything is read or touched
    plan = ctx.driver.describe_restore(manifest, request)
    if len(chain) > 1:
        plan.insert(1, "backup chain: " + " <- ".join(f"{m.backup_id} ({m.backup_type})" for m in chain))
    if request.dry_run:
        lines = ["plan (dry run, nothing touched):", *("  " + line for line in plan)]
        if emit is not None:
            for line in lines:
                emit(line)
        ctx.driver.check_target(manifest, request)
        return lines
    ctx.driver.check_target(manifest, request)
    source = RepositorySource(ctx.repository, manifest, ctx.identities, str(ctx.identity_file), chain)
    with structlog.contextvars.bound_contextvars(job=ctx.name, backup_id=manifest.backup_id, stage="restore"):
        log.info("restore started", to=request.to)
        message = ctx.driver.restore(source, request)
        log.info("restore finished")
    if emit:
        emit(message)
    return [message]
