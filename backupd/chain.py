"""Backup types and chains (DESIGN.md "Backup types"): which parent a diff or incr is taken against,
and the chain a restore needs, from the full to the backup itself.

A full stands alone; a diff is taken against the newest full, an incr against the
newest backup of any type (same method). Each records ``metadata.type`` and
``metadata.parent``; the chain of a backup is read by following ``parent`` back to a
full. Everything here is pure: the repository reads the manifests
(``Repository.chain``).
"""

from __future__ import annotations

from typing import Callable

from backupd.errors import BackupdError, BackupNotFound, BrokenChain, IntegrityError, UntrustedObject
from backupd.manifest import Manifest
from backupd.timeutil import BACKUP_ID_RE, backup_id_sort_key

FULL, DIFF, INCR = "full", "diff", "incr"
BACKUP_TYPES = (FULL, DIFF, INCR)
#: Methods whose backups may be diff or incr on a driver with the ``INCREMENTAL_BACKUP`` capability.
INCREMENTAL_METHODS = ("physical",)
#: No chain is longer: a bound on what a hostile repository can make a reader follow.
MAX_CHAIN = 10_000


def supports_types(capabilities: frozenset[str], method: str) -> bool:
    """Whether backups of ``method`` may be diff or incr on a driver with ``capabilities``."""
    from backupd.descriptor import INCREMENTAL_BACKUP

    return INCREMENTAL_BACKUP in capabilities and method in INCREMENTAL_METHODS


def article(word: str) -> str:
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"


def newest_first(manifests: list[Manifest]) -> list[Manifest]:
    return sorted(manifests, key=lambda m: backup_id_sort_key(m.backup_id), reverse=True)


def choose_parent(manifests: list[Manifest], backup_type: str, method: str) -> Manifest | None:
    """The parent of a new ``backup_type`` backup among committed, trusted ``manifests``; None when the
    repository holds no full of ``method`` (the caller then takes a full)."""
    same = newest_first([m for m in manifests if m.method == method])
    fulls = [m for m in same if m.backup_type == FULL]
    if not fulls:
        return None
    return fulls[0] if backup_type == DIFF else same[0]


def check_type(manifest: Manifest) -> None:
    """IntegrityError unless the manifest's type and parent fit together."""
    kind, parent = manifest.backup_type, manifest.parent
    if kind not in BACKUP_TYPES:
        raise IntegrityError(f"backup {manifest.backup_id}: unknown backup type {kind!r}")
    if kind == FULL and parent is not None:
        raise IntegrityError(f"backup {manifest.backup_id}: a full backup names a parent ({parent})")
    if kind != FULL and parent is None:
        raise IntegrityError(f"backup {manifest.backup_id}: {article(kind)} {kind} backup names no parent")
    if parent is not None and not BACKUP_ID_RE.match(parent):
        raise IntegrityError(f"backup {manifest.backup_id}: its parent {parent!r} is not a backup id")


def resolve_chain(manifest: Manifest, load: Callable[[str], Manifest]) -> list[Manifest]:
    """The chain of ``manifest``, full first, itself last (``[manifest]`` for a full).

    ``load`` reads one manifest by id, checked (and signature-checked) as any other.
    BrokenChain (one line naming the backup it lacks) when a parent is missing, unreadable,
    untrusted, not older than its child, of another method, or when a diff's parent is not a full.
    """
    chain = [manifest]
    check_type(manifest)
    while (parent_id := chain[-1].parent) is not None:
        child = chain[-1]
        if len(chain) > MAX_CHAIN:
            raise BrokenChain(f"backup {manifest.backup_id}: chain longer than {MAX_CHAIN} backups")
        try:
            parent = load(parent_id)
        except BackupdError as exc:
            raise BrokenChain(f"backup {child.backup_id} needs its parent backup {parent_id}, which is "
                              f"{_why(exc)}", hint="restore or verify an older full instead; the next backup of "
                              "this type is taken against a complete chain") from None
        if backup_id_sort_key(parent_id) >= backup_id_sort_key(child.backup_id):
            raise BrokenChain(f"backup {child.backup_id}: its parent {parent_id} is not older than it")
        if parent.method != child.method:
            raise BrokenChain(f"backup {child.backup_id}: its parent {parent_id} is a {parent.method} backup")
        try:
            check_type(parent)
        except IntegrityError as exc:
            raise BrokenChain(f"backup {child.backup_id} needs its parent backup {parent_id}, which is unusable: "
                              f"{exc}") from None
        if child.backup_type == DIFF and parent.backup_type != FULL:
            raise BrokenChain(f"backup {child.backup_id}: a diff whose parent {parent_id} is not a full")
        chain.append(parent)
    chain.reverse()
    return chain


def _why(exc: BackupdError) -> str:
    if isinstance(exc, BackupNotFound):
        return "missing from the repository"
    if isinstance(exc, UntrustedObject):
        return f"not trusted: {exc}"
    return f"unusable: {exc}"
