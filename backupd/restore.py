"""Restoring: choose the backup, then let the driver write it out."""

from __future__ import annotations

from typing import BinaryIO, Callable, Sequence

import structlog

from backupd.context import JobContext
from backupd.driver import RestoreRequest
from backupd.errors import BackupNotFound, IntegrityError
from backupd.logarchive import LogArchive, LogObject
from backupd.manifest import Manifest
from backupd.repository import Repository

log = structlog.get_logger(__name__)


class RepositorySource:
    """A committed backup read back through the pipeline (the driver's BackupSource)."""

    def __init__(self, repo: Repository, manifest: Manifest, identities: Sequence[object], key_file: str | None,
                 *, listings: dict[str, list[LogObject]] | None = None) -> None:
        """``listings``: whole log listings shared with other sources of one command (``JobContext.one_listing``)."""
        self.repo = repo
        self._listings = listings
        self.manifest = manifest
        self._identities = identities
        self._key_file = key_file

    def open(self, name: str) -> BinaryIO:
        self.manifest = self.repo.load_full(self.manifest)  # chosen from the index: its streams are in the manifest
        try:
            return self.repo.open_stream(self.manifest, name, self._identities, self._key_file)  # type: ignore[return-value]
        except KeyError:
            raise BackupNotFound(f"backup {self.manifest.backup_id} has no stream {name!r}") from None

    def logs(self, kind: str) -> LogArchive:
        archive = LogArchive(self.repo.storage, self.repo.job, kind, trusted=self.repo.trusted,  # type: ignore[arg-type]
                             allow_unsigned=self.repo.allow_unsigned)
        archive.listings = self._listings
        return archive

    def open_log(self, kind: str, name: str) -> BinaryIO:
        return self.logs(kind).open(name, self._identities, self._key_file)  # type: ignore[return-value]


def choose(ctx: JobContext, manifests: list[Manifest], request: RestoreRequest, backup_id: str | None) -> Manifest:
    """The driver's choice among the index's backups, its manifest read by key and checked again; one that
    fails that check (replaced since it was indexed, no longer signed) is skipped with a warning."""
    while True:
        chosen = ctx.driver.choose_backup(manifests, request, backup_id)
        try:
            return ctx.repository.load_full(chosen)
        except IntegrityError as exc:
            if backup_id or len(manifests) <= 1:
                raise
            log.warning("backup skipped: its manifest is unusable", job=ctx.name, backup_id=chosen.backup_id,
                        error=str(exc))
            manifests = [m for m in manifests if m.backup_id != chosen.backup_id]


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
    manifest = choose(ctx, manifests, request, backup_id)
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
