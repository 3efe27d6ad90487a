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
                 chain: list[Manifest] | None = None, *, listings: dict[str, list[LogObject]] | None = None,
                 summary_ok: bool = False) -> None:
        """``chain``: ``repo.chain(manifest)`` when the caller resolved it already; else read on first use.
        ``listings``: whole log listings shared with other sources of one command (``JobContext.one_listing``).
        ``summary_ok``: ``manifest`` may stay the index's summary (``log_reach`` reads only its PITR start);
        else a driver sees the whole manifest (read by key on first use), never a summary without its streams,
        row counts and tool versions."""
        self.repo = repo
        self._listings = listings
        self._manifest = manifest
        self._summary_ok = summary_ok
        self._identities = identities
        self._key_file = key_file
        self._chain = chain

    @property
    def manifest(self) -> Manifest:
        if not self._summary_ok:
            self._manifest = self.repo.load_full(self._manifest)
        return self._manifest

    @property
    def chain(self) -> list[Manifest]:
        if self._chain is None:
            self._chain = self.repo.chain(self.manifest)
        return self._chain

    def open(self, name: str) -> BinaryIO:
        return self._open(self.repo.load_full(self.manifest), name)  # an index summary lists no streams

    def open_from(self, backup_id: str, name: str) -> BinaryIO:
        if backup_id == self.manifest.backup_id:
            return self.open(name)
        for manifest in self.chain:
            if manifest.backup_id == backup_id:
                return self._open(self.repo.load_full(manifest), name)
        raise BackupNotFound(f"backup {backup_id} is not in the chain of backup {self.manifest.backup_id}")

    def _open(self, manifest: Manifest, name: str) -> BinaryIO:
        try:
            return self.repo.open_stream(manifest, name, self._identities, self._key_file)  # type: ignore[return-value]
        except KeyError:
            raise BackupNotFound(f"backup {manifest.backup_id} has no stream {name!r}") from None

    def logs(self, kind: str) -> LogArchive:
        archive = LogArchive(self.repo.storage, self.repo.job, kind, trusted=self.repo.trusted,  # type: ignore[arg-type]
                             allow_unsigned=self.repo.allow_unsigned)
        archive.listings = self._listings
        return archive

    def open_log(self, kind: str, name: str) -> BinaryIO:
        return self.logs(kind).open(name, self._identities, self._key_file)  # type: ignore[return-value]


def choose(ctx: JobContext, manifests: Sequence[Manifest], request: RestoreRequest, backup_id: str | None) -> Manifest:
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
    manifests: Sequence[Manifest]
    if backup_id:  # only the named backup's manifest is read (its own error, if any)
        manifests = [ctx.repository.load_manifest(backup_id)]
    else:  # an unusable manifest is skipped (with a warning naming it); the index's entries parsed as chosen
        manifests = ctx.repository.usable()
    manifest = choose(ctx, manifests, request, backup_id)
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
