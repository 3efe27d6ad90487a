"""The per-job index of committed backups: ``<job>/index.json`` (DESIGN.md "Repository format").

Every command that needs the job's backups reads this one object instead of listing
the repository and reading every manifest. The manifests stay the source of truth; the
index is derived from them and rebuilt (one listing, one GET per manifest) whenever it is
missing, unreadable, of another job, or not vouched for. It is kept true cheaply: every read
lists the keys past its newest backup (a commit whose index update was lost), a prune
reconciles it with the listing of ``backups/`` it makes anyway, and the daemon's integrity
rotation checks it against every manifest (``reverify``).

Document::

    {"index": {"format_version": 1, "job": ..., "written_at": ...,
               "unusable": [{"backup_id", "problem"}],  # manifests a rebuild could not read
               "logs": {KIND: {DIRECTORY: NEWEST NAME}},  # as far as the last prune listed them
               "log_summary": {KIND: SUMMARY},  # optional: the last full check's reaches (backupd.logsummary)
               "backup_summary": {"backup_ids", "finished_us", "pending"},  # of the entries, in their order
               "backups": [ENTRY, ...]},            # oldest first, one a line (backupd.indexread)
     "signature": "-----BEGIN SSH SIGNATURE-----..." | null}

An ENTRY holds what ``list``, ``prune``, ``status`` and restore's choice of a backup need
(id, driver, method, type, parent, times, sizes, the manifest's small metadata with its
PITR start), the sha256 of the manifest (of its canonical form, ``digest``), and who signed the manifest (``signer``:
the OpenSSH public key whose signature over those bytes checks out; ``signature``:
signed, unsigned or bad). ``pending`` marks a backup whose manifest was being put when the
index was written: readers stat that one manifest to learn whether it committed.

Writes are compare-and-swap (``Storage.read_versioned``/``replace``): a writer re-reads
and re-applies its change when another writer got there first, so concurrent commits
and prunes never lose each other's entries.

Trust: with ``trusted_keys``, the index is used only when a trusted key signed it (the
signature covers ``backupd-index-v1\\n`` and the canonical JSON of ``index``); otherwise
it is rebuilt from the manifests, each judged by its own signature, and an attacker who
can write the repository can neither hide, add nor reorder backups through it. Restore,
verify and prune read the manifest of each backup they act on by key and check its
signature again (``Repository.load_manifest``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import structlog

from backupd import logsummary, sshsig
from backupd.errors import BackupNotFound, IntegrityError, ObjectChanged, ObjectNotFound, StorageError
from backupd.manifest import MANIFEST_NAME, MAX_JSON_DEPTH, Manifest, json_depth
from backupd.signing import Trust
from backupd.storage import ConditionalWritesUnsupported
from backupd.timeutil import BACKUP_ID_RE, backup_id_sort_key, format_timestamp, parse_timestamp, utcnow

if TYPE_CHECKING:
    from backupd.indexread import Entries
    from backupd.repository import Repository

log = structlog.get_logger(__name__)

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
MAX_INDEX_BYTES = 256 << 20
#: A metadata value larger than this (as JSON) stays in the manifest only.
MAX_METADATA_VALUE = 4096
SIGNED_PREFIX = b"backupd-index-v1\n"
WRITE_ATTEMPTS = 16


@dataclass
class IndexedBackup(Manifest):
    """A committed backup as the index describes it: its manifest without the object list, host,
    compression and encryption (``objects`` is empty): whatever reads or checks the streams, or shows
    the manifest, loads it by key (``Repository.load_manifest``, ``load_full``)."""

    sizes: tuple[int, int] = (0, 0)
    manifest_sha256: str = ""
    signature: str = "unknown"  #: signed, unsigned or bad (as whoever wrote the index found it)
    signer: str | None = None  #: the public key line whose signature over the manifest checks out
    problem: str = ""
    pending: bool = False

    @property
    def raw_size(self) -> int:
        return self.sizes[0]

    @property
    def stored_size(self) -> int:
        return self.sizes[1]

    @property
    def parent(self) -> str | None:
        parent = self.metadata.get("parent")
        return parent if isinstance(parent, str) else None

    def trust(self, trusted: tuple[sshsig.PublicKey, ...]) -> Trust | None:
        """What the manifest's signature says to a reader trusting ``trusted`` (None: no trusted keys)."""
        if not trusted:
            return None
        if self.signature == "signed" and self.signer:
            try:
                key = sshsig.parse_public_key(self.signer)
            except sshsig.SignatureError:
                return Trust("bad", problem=f"backup {self.backup_id}: unreadable signer in the index")
            for candidate in trusted:
                if candidate == key:
                    return Trust("signed", candidate)
            return Trust("bad", problem=f"backup {self.backup_id}: signed by ssh-ed25519 {key.fingerprint}, "
                                        f"which is not a trusted key ({len(trusted)} trusted)")
        if self.signature == "unsigned":
            return Trust("unsigned", problem=self.problem or f"backup {self.backup_id}: the manifest is not signed")
        return Trust("bad", problem=self.problem or f"backup {self.backup_id}: bad signature")

    def to_entry(self) -> dict[str, Any]:
        return {
            "backup_id": self.backup_id, "job": self.job, "driver": self.driver, "method": self.method,
            "type": self.backup_type, "parent": self.parent,
            "started_at": format_timestamp(self.started_at), "finished_at": format_timestamp(self.finished_at),
            "raw_size": self.raw_size, "stored_size": self.stored_size,
            "metadata": self.metadata,
            "manifest_sha256": self.manifest_sha256, "signature": self.signature, "signer": self.signer,
            "problem": self.problem, "pending": self.pending,
        }

    @classmethod
    def from_entry(cls, data: Any, job: str) -> IndexedBackup:
        """One entry read back (hostile: every field's type checked; metadata bounded in depth)."""
        if not isinstance(data, dict):
            raise TypeError("an entry of backups is not an object")
        backup_id, entry_job, driver, method, started, finished, digest, signature, problem = (
            data.get(name) for name in ("backup_id", "job", "driver", "method", "started_at", "finished_at",
                                        "manifest_sha256", "signature", "problem"))
        strings = (backup_id, entry_job, driver, method, started, finished, digest, signature, problem)
        if not all(isinstance(value, str) for value in strings):
            raise TypeError(f"entry {str(backup_id)[:40]!r}: a field that must be text is not")
        assert isinstance(backup_id, str) and isinstance(started, str) and isinstance(finished, str)
        if not BACKUP_ID_RE.match(backup_id) or entry_job != job:
            raise ValueError(f"entry {backup_id[:40]!r} of job {str(entry_job)[:40]!r} does not belong here")
        sizes = (data.get("raw_size"), data.get("stored_size"))
        if not all(type(size) is int and size >= 0 for size in sizes):
            raise ValueError(f"entry {backup_id}: sizes are not counts of bytes")
        if signature not in ("signed", "unsigned", "bad", "unknown"):
            raise ValueError(f"entry {backup_id}: signature is {str(signature)[:20]!r}")
        signer, pending, metadata = data.get("signer"), data.get("pending"), data.get("metadata")
        if not isinstance(signer, (str, type(None))) or not isinstance(pending, bool) or not isinstance(metadata, dict):
            raise TypeError(f"entry {backup_id}: signer, pending or metadata of the wrong type")
        if json_depth(metadata) > MAX_JSON_DEPTH:
            raise ValueError(f"entry {backup_id}: metadata nested too deeply")
        return cls(backup_id=backup_id, job=job, driver=str(driver), method=str(method),
                   started_at=parse_timestamp(started), finished_at=parse_timestamp(finished), objects=[],
                   compression={}, encryption={}, metadata=metadata, sizes=sizes,  # type: ignore[arg-type]
                   manifest_sha256=str(digest), signature=str(signature), signer=signer, problem=str(problem),
                   pending=pending)

    @classmethod
    def of(cls, manifest: Manifest, signature: str, signer: str | None, problem: str = "",
           pending: bool = False) -> IndexedBackup:
        """The entry for ``manifest`` whose signature is as given."""
        small = {k: v for k, v in manifest.metadata.items() if len(json.dumps(v)) <= MAX_METADATA_VALUE}
        return cls(backup_id=manifest.backup_id, job=manifest.job, driver=manifest.driver, method=manifest.method,
                   started_at=manifest.started_at, finished_at=manifest.finished_at, objects=[],
                   compression={}, encryption={}, metadata=small,
                   sizes=(manifest.raw_size, manifest.stored_size), manifest_sha256=digest(manifest),
                   signature=signature, signer=signer, problem=problem, pending=pending)


class Index:
    """One job's index document (``backups`` oldest first). Read from storage, its entries are parsed when
    first used (``indexread``): ``ids``, ``newest_id``, ``all_ids``, ``pending_ids`` and ``usable`` parse none."""

    def __init__(self, job: str, backups: list[IndexedBackup] | None = None, unusable: dict[str, str] | None = None,
                 logs: dict[str, dict[str, str]] | None = None,
                 log_summary: dict[str, logsummary.LogSummary] | None = None, *, entries: Entries | None = None,
                 version: str | None = None, source: str = "index") -> None:
        self.job = job
        self._backups = backups if backups is not None or entries is not None else []
        self._entries = entries
        self.unusable = unusable if unusable is not None else {}
        self.logs = logs if logs is not None else {}
        #: Per log kind, the archive as the last full check listed it (``backupd.logsummary``); optional.
        self.log_summary = log_summary if log_summary is not None else {}
        #: The storage version this was read as (None: not in storage, or rebuilt); where it came from.
        self.version = version
        self.source = source

    @property
    def backups(self) -> list[IndexedBackup]:
        """Every entry, pending ones too, oldest first (all of them parsed, as far as a ``LazyBackup`` is)."""
        if self._backups is None:
            assert self._entries is not None
            self._backups = self._entries.all()
        return self._backups

    @backups.setter
    def backups(self, backups: list[IndexedBackup]) -> None:
        self._backups, self._entries = backups, None

    @property
    def committed(self) -> list[IndexedBackup]:
        """The backups whose manifest exists, oldest first (pending commits left out)."""
        return [b for b in self.backups if not b.pending]

    def ids(self) -> list[str]:
        if self._backups is None and self._entries is not None:
            return [self._entries.ids[n] for n in self._entries.committed()]
        return [b.backup_id for b in self.committed]

    def all_ids(self) -> set[str]:
        """Every entry's id, pending ones too."""
        if self._backups is None and self._entries is not None:
            return set(self._entries.ids)
        return {b.backup_id for b in self.backups}

    def newest_id(self) -> str | None:
        """The newest entry's id, pending or not."""
        if self._backups is None and self._entries is not None:
            return self._entries.ids[-1] if self._entries.ids else None
        return self.backups[-1].backup_id if self.backups else None

    def pending_ids(self) -> list[str]:
        if self._backups is None and self._entries is not None:
            return sorted(self._entries.pending, key=backup_id_sort_key)
        return [b.backup_id for b in self.backups if b.pending]

    def committed_now(self, backup_id: str) -> None:
        """A pending entry's manifest was found: it is committed."""
        if self._backups is None and self._entries is not None:
            self._entries.committed_now(backup_id)
            return
        for entry in self.backups:
            if entry.backup_id == backup_id:
                entry.pending = False

    def usable(self) -> Sequence[IndexedBackup]:
        """The committed backups, newest first; read from storage, each parsed only when looked at."""
        from backupd.indexread import Newest

        if self._backups is None and self._entries is not None:
            return Newest(self._entries)
        return self.committed[::-1]

    def by_id(self) -> dict[str, IndexedBackup]:
        return {entry.backup_id: entry for entry in self.backups}

    def put(self, entry: IndexedBackup) -> None:
        key = backup_id_sort_key(entry.backup_id)
        self.unusable.pop(entry.backup_id, None)
        self._forget_reaches({entry.backup_id})
        if not self.backups or key > backup_id_sort_key(self.backups[-1].backup_id):
            self.backups.append(entry)  # a new newest backup: the usual commit
            return
        self.backups = [b for b in self.backups if b.backup_id != entry.backup_id] + [entry]
        self.backups.sort(key=lambda b: backup_id_sort_key(b.backup_id))

    def drop(self, backup_ids: set[str]) -> None:
        self.backups = [b for b in self.backups if b.backup_id not in backup_ids]
        for gone in backup_ids:
            self.unusable.pop(gone, None)
        self._forget_reaches(backup_ids)

    def _forget_reaches(self, backup_ids: set[str]) -> None:
        """A recorded reach goes with its backup (a prune's), and with a manifest indexed anew."""
        for summary in self.log_summary.values():
            for backup_id in backup_ids & summary.reaches.keys():
                del summary.reaches[backup_id]

    def payload(self) -> dict[str, Any]:
        from backupd import indexread

        payload = {"format_version": FORMAT_VERSION, "job": self.job, "written_at": format_timestamp(utcnow()),
                   "unusable": [{"backup_id": k, "problem": v} for k, v in sorted(self.unusable.items())],
                   "logs": self.logs}
        if self.log_summary:
            payload["log_summary"] = {kind: s.to_json() for kind, s in sorted(self.log_summary.items())}
        payload["backup_summary"] = indexread.summary(self.backups)
        payload["backups"] = [b.to_entry() for b in self.backups]
        return payload

    def to_bytes(self, signing_key: sshsig.SigningKey | None) -> bytes:
        from backupd import indexread

        payload = self.payload()
        signature = sshsig.sign(signed_message(payload), signing_key) if signing_key is not None else None
        return indexread.document(payload, signature)


def signed_message(payload: dict[str, Any]) -> bytes:
    return SIGNED_PREFIX + json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def parse(raw: bytes, job: str, trusted: tuple[sshsig.PublicKey, ...], where: str) -> Index:
    """The index in ``raw``; IntegrityError naming what is wrong (with trusted keys: unless a trusted key signed it).

    Without trusted keys, an index as ``Index.to_bytes`` writes it is read lazily (``backupd.indexread``): its
    head and summary parsed, each entry when first used. Anything else (an index written before summaries;
    with trusted keys, whose signature covers the whole) is parsed whole."""
    if not trusted:
        from backupd import indexread

        lazily = indexread.read(raw, job, where)
        if lazily is not None:
            entries, head = lazily
            unusable, logs, summaries = _head(head, where)
            return Index(job, unusable=unusable, logs=logs, log_summary=summaries, entries=entries)
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"{where}: unreadable index ({exc.__class__.__name__})") from None
    if not isinstance(document, dict) or not isinstance(document.get("index"), dict):
        raise IntegrityError(f"{where}: not a backupd index")
    payload = document["index"]
    if payload.get("format_version") != FORMAT_VERSION:
        raise IntegrityError(f"{where}: index format_version {payload.get('format_version')!r} is not supported")
    if payload.get("job") != job:
        raise IntegrityError(f"{where}: the index names job {str(payload.get('job'))[:60]!r}, not {job}")
    try:
        backups = [IndexedBackup.from_entry(entry, job) for entry in payload.get("backups", [])]
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise IntegrityError(f"{where}: unreadable index ({exc})") from None
    unusable, logs, summaries = _head(payload, where)
    if trusted:
        signature = document.get("signature")
        if not isinstance(signature, str):
            raise IntegrityError(f"{where}: the index is not signed and trusted_keys is set")
        try:
            sshsig.verify(signed_message(payload), signature, trusted, what=f"{where} signature")
        except sshsig.SignatureError as exc:
            raise IntegrityError(str(exc)) from None
        except (RecursionError, ValueError):
            raise IntegrityError(f"{where}: unreadable index (nested too deeply)") from None
    if len({b.backup_id for b in backups}) != len(backups):
        raise IntegrityError(f"{where}: the index lists a backup twice")
    backups.sort(key=lambda b: backup_id_sort_key(b.backup_id))
    return Index(job, backups, unusable, logs, summaries)


def _head(payload: dict[str, Any], where: str
          ) -> tuple[dict[str, str], dict[str, dict[str, str]], dict[str, logsummary.LogSummary]]:
    """(unusable, logs, log summaries) of an index's payload."""
    try:
        unusable = {str(u["backup_id"]): str(u["problem"]) for u in payload.get("unusable", [])}
        logs = {str(kind): {str(d): str(n) for d, n in dirs.items()} for kind, dirs in payload.get("logs", {}).items()}
        summaries = logsummary.parse(payload.get("log_summary"))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise IntegrityError(f"{where}: unreadable index ({exc})") from None
    return unusable, logs, summaries


def index_key(job: str) -> str:
    return f"{job}/{INDEX_NAME}"


def assess(repo: Repository, manifest: Manifest, raw: bytes) -> tuple[str, str | None, str]:
    """(signature status, signer's public key line, problem) of a manifest read from the repository."""
    from backupd.signing import signature_key

    sig_key = signature_key(repo.manifest_key(manifest.backup_id))
    try:
        handle = repo.storage.open(sig_key)
        try:
            armored = handle.read(sshsig.MAX_ARMOR + 1)
        finally:
            handle.close()
    except ObjectNotFound:
        return "unsigned", None, f"{sig_key}: missing; the manifest is not signed"
    try:
        return "signed", sshsig.signer_of(raw, armored, what=sig_key).line(), ""
    except sshsig.SignatureError as exc:
        return "bad", None, str(exc)


def rebuild(repo: Repository) -> Index:
    """The index from the manifests themselves: one listing, one read of each manifest and its signature."""
    index = Index(repo.job, source="rebuilt")
    for backup_id in repo.scan()[0]:  # oldest first: each put appends
        try:
            manifest, status = repo.read_for_index(backup_id)
        except BackupNotFound:
            continue  # deleted since the listing (a prune)
        except IntegrityError as exc:
            index.unusable[backup_id] = str(exc)
            continue
        index.put(IndexedBackup.of(manifest, *status))
    log.info("index rebuilt from the manifests", job=repo.job, backups=len(index.backups),
             unusable=len(index.unusable))
    return index


def read(repo: Repository) -> Index:
    """The job's index as stored, vouched for and with pending commits resolved; rebuilt (and, where this
    host may, written back) when missing, unreadable or not trusted."""
    key = index_key(repo.job)
    try:
        stored = repo.storage.read_versioned(key, MAX_INDEX_BYTES)
    except ObjectNotFound:
        return _rebuilt(repo, None, "missing")
    except ConditionalWritesUnsupported:
        return rebuild(repo)
    try:
        index = parse(stored.data, repo.job, repo.trusted, key)
    except IntegrityError as exc:
        log.warning("index unusable; rebuilding it from the manifests", job=repo.job, error=str(exc))
        return _rebuilt(repo, stored.version, str(exc))
    index.version = stored.version
    _resolve_pending(repo, index)
    _recheck_unusable(repo, index)
    _catch_up(repo, index)
    return index


def _recheck_unusable(repo: Repository, index: Index) -> None:
    """Read again the manifests the index records as unusable (rare, and they may have been repaired)."""
    for backup_id in list(index.unusable):
        try:
            manifest, status = repo.read_for_index(backup_id)
        except BackupNotFound:
            del index.unusable[backup_id]
        except IntegrityError as exc:
            index.unusable[backup_id] = str(exc)
        else:
            index.put(IndexedBackup.of(manifest, *status))


def _rebuilt(repo: Repository, version: str | None, why: str) -> Index:
    index = rebuild(repo)
    if repo.trusted and repo.signing_key is None:
        return index  # nobody here can sign it: readers would rebuild it all the same
    try:
        index.version = repo.storage.replace(index_key(repo.job), index.to_bytes(repo.signing_key), version=version)
    except (ObjectChanged, StorageError) as exc:  # another writer, or a read-only host: used, not stored
        log.debug("rebuilt index not stored", job=repo.job, why=why, error=str(exc))
    return index


def _resolve_pending(repo: Repository, index: Index) -> None:
    """A pending entry is a commit in flight or interrupted: once its manifest exists it is committed;
    until then it stays pending (left out of ``committed``; a prune drops it once no run is live)."""
    for backup_id in index.pending_ids():
        if repo.has_backup(backup_id):
            index.committed_now(backup_id)


def _catch_up(repo: Repository, index: Index) -> None:
    """Add what was committed past the index's newest backup (a commit whose index update was lost, a
    backup written by an older backupd, one put there by hand): one listing of the keys after it."""
    layout = repo.layout
    newest = index.newest_id()
    listed = repo.storage.list_after(layout.backups_prefix, layout.backups_prefix + newest) if newest \
        else repo.storage.list(layout.backups_prefix)
    known = index.all_ids() | set(index.unusable)
    for info in listed:
        backup_id, rest = layout.split_backup_key(info.key)
        if rest != MANIFEST_NAME or backup_id in known or not BACKUP_ID_RE.match(backup_id):
            continue
        log.info("backup committed past the index; adding it", job=repo.job, backup_id=backup_id)
        try:
            manifest, status = repo.read_for_index(backup_id)
        except BackupNotFound:
            continue
        except IntegrityError as exc:
            index.unusable[backup_id] = str(exc)
            continue
        index.put(IndexedBackup.of(manifest, *status))


def reverify(repo: Repository) -> Index:
    """Check the stored index against every manifest (one listing, a read of each manifest and signature:
    the daemon's integrity rotation does it once per run); where they differ, the manifests win and the
    index is rewritten. Returns the index as the manifests say."""
    fresh = rebuild(repo)
    stored = read(repo)

    def summary(index: Index) -> tuple[dict[str, tuple[str, str, str | None]], dict[str, str]]:
        return ({b.backup_id: (b.manifest_sha256, b.signature, b.signer) for b in index.committed},
                dict(index.unusable))

    if summary(fresh) == summary(stored):
        return stored
    log.warning("the index disagrees with the manifests; rewritten from them", job=repo.job)

    def replace_all(index: Index) -> None:
        pending = [b for b in index.backups if b.pending and b.backup_id not in {f.backup_id for f in fresh.backups}]
        index.backups = sorted(fresh.backups + pending, key=lambda b: backup_id_sort_key(b.backup_id))
        index.unusable = dict(fresh.unusable)

    try:
        return update(repo, replace_all)
    except StorageError as exc:
        log.warning("index not rewritten", job=repo.job, error=str(exc))
        return fresh


def update(repo: Repository, change: Callable[[Index], None]) -> Index:
    """Apply ``change`` to the stored index with compare-and-swap, re-reading and re-applying it when
    another writer got there first; the index written. A host that cannot write conditionally
    (or sign, where readers require it) leaves the index to the next rebuild."""
    key = index_key(repo.job)
    for _ in range(WRITE_ATTEMPTS):
        index = read(repo)
        change(index)
        try:
            index.version = repo.storage.replace(key, index.to_bytes(repo.signing_key), version=index.version)
            return index
        except ObjectChanged:
            continue
        except ConditionalWritesUnsupported:
            repo.storage.delete(key)  # stale from now on: the next reader rebuilds it
            return index
    raise StorageError(f"{repo.storage.location}{key}: changed by other writers {WRITE_ATTEMPTS} times in a row")


def digest(manifest: Manifest) -> str:
    """The sha256 the index records of a manifest: of its canonical form (``Manifest.to_json``, the bytes
    backupd writes), so it can be compared whichever repository or reader produced the manifest."""
    return hashlib.sha256(manifest.to_json()).hexdigest()


def checked(repo: Repository, entry: IndexedBackup, manifest: Manifest) -> None:
    """IntegrityError unless the manifest read by key is the one the index describes."""
    if digest(manifest) != entry.manifest_sha256:
        raise IntegrityError(f"{repo.manifest_key(manifest.backup_id)}: differs from the index's record of it "
                             f"(replaced since it was indexed)")
    if manifest.started_at != entry.started_at:
        raise IntegrityError(f"{repo.manifest_key(manifest.backup_id)}: its start differs from the index")


def newest_logs(names: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """{kind: {directory: newest name}} of log names listed per kind (``dir/name``, or a bare name: '')."""
    result: dict[str, dict[str, str]] = {}
    for kind, listed in names.items():
        newest: dict[str, str] = {}
        for name in listed:
            directory = name.rpartition("/")[0]
            if name > newest.get(directory, ""):
                newest[directory] = name
        if newest:
            result[kind] = newest
    return result
