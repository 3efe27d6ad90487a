"""Reading a stored index without parsing the entries a command does not use (issue 22).

``Index.to_bytes`` writes the document one entry a line, its head (everything before
``"backups":[``) carrying a ``backup_summary`` of every entry in order: its id, when it finished (in
microseconds since the epoch) and which are pending. That is all that choosing a backup by time,
catching up with commits and finding the newest backup look at, so a reader parses the head
and leaves each line alone until something else of its entry is asked for (``LazyBackup``). The
document is JSON all the same: an older backupd, and readers with trusted keys (the signature
covers the whole payload), parse it whole.

A summary that disagrees with its lines is an IntegrityError when the entry concerned is parsed;
a document not laid out this way (written before, or by hand) is parsed whole.
"""

from __future__ import annotations

import datetime as dt
import json
import operator
from typing import Any, Sequence, overload

from backupd.errors import IntegrityError
from backupd.index import FORMAT_VERSION, IndexedBackup
from backupd.manifest import MAX_JSON_DEPTH, Manifest, json_depth
from backupd.timeutil import BACKUP_ID_RE, backup_id_sort_key

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
MICROSECOND = dt.timedelta(microseconds=1)
BACKUPS_START = b',"backups":['
#: Entries found by searching the document before its lines are split (a split costs about as much as
#: a few searches, and most commands use a handful of entries or all of them).
FOUND_BEFORE_SPLIT = 8
DIGITS = str.maketrans("0123456789", "0000000000")
PLAIN_ID_SHAPE = "00000000T000000Z\n"  #: a backup id without suffix, its digits zeroed (``timeutil.BACKUP_ID_RE``)


def microseconds(moment: dt.datetime) -> int:
    return (moment - EPOCH) // MICROSECOND


def summary(backups: Sequence[IndexedBackup]) -> dict[str, list[Any]]:
    """The head's summary of ``backups`` (in their order)."""
    return {"backup_ids": [b.backup_id for b in backups],
            "finished_us": [microseconds(b.finished_at) for b in backups],
            "pending": [b.backup_id for b in backups if b.pending]}


def document(payload: dict[str, Any], signature: str | None) -> bytes:
    """The index document of ``payload`` (its ``backups`` last), one entry a line."""
    head = {k: v for k, v in payload.items() if k != "backups"}
    lines = ['{"index":' + json.dumps(head, separators=(",", ":"))[:-1] + BACKUPS_START.decode()]
    lines += [("," if n else "") + json.dumps(entry, separators=(",", ":")) for n, entry in enumerate(payload["backups"])]
    lines.append(']},"signature":' + json.dumps(signature) + "}")
    return ("\n".join(lines) + "\n").encode()


class LazyBackup(IndexedBackup):
    """An index entry known by its id, finish and pending flag; anything else asked of it parses its line, once."""

    def __init__(self, backup_id: str, finished: int, pending: bool, line: bytes, job: str, where: str) -> None:
        # not IndexedBackup's constructor: the other fields come from ``line`` when first asked for
        self.__dict__.update(backup_id=backup_id, finished_at=EPOCH + finished * MICROSECOND, pending=pending,
                             _summary=(finished, pending), _line=line, _job=job, _where=where, _whole=None)

    def whole(self) -> IndexedBackup:
        """The entry parsed from its line (once); IntegrityError when it does not parse or contradicts the summary."""
        whole: IndexedBackup | None = self.__dict__["_whole"]
        if whole is None:
            where = self.__dict__["_where"]
            try:
                whole = IndexedBackup.from_entry(json.loads(self.__dict__["_line"]), self.__dict__["_job"])
            except (ValueError, TypeError, RecursionError) as exc:
                raise IntegrityError(f"{where}: unreadable index entry {self.backup_id} ({exc})") from None
            if (whole.backup_id, (microseconds(whole.finished_at), whole.pending)) != (
                    self.backup_id, self.__dict__["_summary"]):
                raise IntegrityError(f"{where}: index entry {self.backup_id} differs from the index's backup summary of it")
            self.__dict__["_whole"] = whole
        return whole


def _delegate(name: str) -> property:
    def get(self: LazyBackup) -> Any:
        return getattr(self.whole(), name)

    def set_(self: LazyBackup, value: Any) -> None:
        setattr(self.whole(), name, value)

    return property(get, set_)


for _field in IndexedBackup.__dataclass_fields__:
    if _field not in ("backup_id", "finished_at", "pending"):  # known from the summary
        setattr(LazyBackup, _field, _delegate(_field))


class Entries:
    """The entries of a stored index by position (oldest first), each parsed when first asked for."""

    def __init__(self, raw: bytes, start: int, end: int, ids: list[str], finished: list[int], pending: set[str],
                 job: str, where: str) -> None:
        self._raw, self._start, self._end = raw, start, end
        self.ids, self.finished, self.pending = ids, finished, pending
        self._job, self._where = job, where
        self._made: dict[int, LazyBackup] = {}
        self._lines: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def entry(self, position: int) -> LazyBackup:
        made = self._made.get(position)
        if made is None:
            backup_id = self.ids[position]
            made = self._made[position] = LazyBackup(backup_id, self.finished[position], backup_id in self.pending,
                                                     self._line(position), self._job, self._where)
        return made

    def all(self) -> list[IndexedBackup]:
        """Every entry (those handed out already as they were), the rest parsed together in one pass."""
        if len(self._made) < FOUND_BEFORE_SPLIT:
            try:
                data = json.loads(b"[" + self._raw[self._start:self._end] + b"]")  # the lines after the first: ",{...}"
                whole = [IndexedBackup.from_entry(entry, self._job) for entry in data]
            except (ValueError, TypeError, RecursionError) as exc:
                raise IntegrityError(f"{self._where}: unreadable index ({exc})") from None
            if [entry.backup_id for entry in whole] != self.ids:
                raise IntegrityError(f"{self._where}: the index's backup summary does not match its entries")
            for entry in whole:
                entry.pending = entry.backup_id in self.pending  # as resolved since (``committed_now``)
            return [self._made.get(position) or entry for position, entry in enumerate(whole)]
        return [self.entry(position) for position in range(len(self.ids))]

    def committed(self) -> list[int]:
        """Positions of the entries whose manifest exists, oldest first."""
        if not self.pending:
            return list(range(len(self.ids)))
        return [n for n, backup_id in enumerate(self.ids) if backup_id not in self.pending]

    def committed_now(self, backup_id: str) -> None:
        """A pending entry's manifest was found: it is committed."""
        self.pending.discard(backup_id)
        for made in self._made.values():
            if made.backup_id == backup_id:
                made.pending = False

    def _line(self, position: int) -> bytes:
        """The line of the entry at ``position``: the one that begins with its id (``to_entry`` puts it first),
        looked for in the document for the first few entries asked for, then from all of its lines split once."""
        if self._lines is None and len(self._made) >= FOUND_BEFORE_SPLIT:
            lines = self._raw[self._start:self._end].split(b"\n")[:-1]
            if len(lines) != len(self.ids):
                raise IntegrityError(f"{self._where}: the index's backup summary does not match its entries")
            self._lines = [line[1:] if n else line for n, line in enumerate(lines)]
        if self._lines is not None:
            return self._lines[position]
        entry = b'{"backup_id":"' + self.ids[position].encode() + b'"'
        before = b"\n," if position else b"\n"  # every entry after the first begins with its comma
        found = self._raw.find(before + entry, self._start - 1, self._end)
        if found < 0:
            raise IntegrityError(f"{self._where}: the index's backup summary names {self.ids[position]}, its entries do not")
        start = found + len(before)
        return self._raw[start:self._raw.index(b"\n", start)]


class Newest(Sequence[IndexedBackup]):
    """The committed entries of ``Entries``, newest first, each parsed when first asked for."""

    def __init__(self, entries: Entries) -> None:
        self._entries = entries
        self._positions = entries.committed()[::-1]

    def __len__(self) -> int:
        return len(self._positions)

    @overload
    def __getitem__(self, item: int) -> IndexedBackup: ...

    @overload
    def __getitem__(self, item: slice) -> Sequence[IndexedBackup]: ...

    def __getitem__(self, item: int | slice) -> IndexedBackup | Sequence[IndexedBackup]:
        if isinstance(item, slice):
            return [self._entries.entry(p) for p in self._positions[item]]
        return self._entries.entry(self._positions[item])

    def newest_finished_by(self, moment: dt.datetime) -> IndexedBackup | None:
        """The entry that finished last by ``moment`` (the newest of those that finished then), from the summary."""
        bound, finished = microseconds(moment), self._entries.finished
        if self._entries.pending:
            finished = [finished[p] if self._entries.ids[p] not in self._entries.pending else bound + 1
                        for p in range(len(finished))]
        last = max(filter(bound.__ge__, finished), default=None)
        if last is None:
            return None
        return self._entries.entry(len(finished) - 1 - finished[::-1].index(last))


def _backup_ids(ids: list[Any]) -> bool:
    """Whether every item is a backup id (most are plain ones, checked by their shape in one pass)."""
    if not set(map(type, ids)) <= {str}:
        return False
    if "\n".join(ids).translate(DIGITS) + "\n" == PLAIN_ID_SHAPE * len(ids) or not ids:
        return True
    return all(BACKUP_ID_RE.match(backup_id) for backup_id in ids)


def newest_finished_by(manifests: Sequence[Manifest], moment: dt.datetime) -> Manifest | None:
    """Of ``manifests`` (newest first), the one that finished last by ``moment``; the newest where several did."""
    if isinstance(manifests, Newest):
        return manifests.newest_finished_by(moment)
    eligible = [m for m in manifests if m.finished_at <= moment]
    return max(eligible, key=lambda m: m.finished_at) if eligible else None


def read(raw: bytes, job: str, where: str) -> tuple[Entries, dict[str, Any]] | None:
    """(the entries, the head's payload) of an index written one entry a line with a summary; None when ``raw``
    is not laid out that way; IntegrityError when it is and the head is wrong."""
    head_end = raw.find(b"\n")
    tail_start = raw.rfind(b"\n", 0, len(raw) - 1) + 1
    if (head_end < len(BACKUPS_START) or not raw.endswith(b"\n") or tail_start <= head_end
            or not raw.startswith(BACKUPS_START, head_end - len(BACKUPS_START)) or not raw.startswith(b"]", tail_start)):
        return None
    try:
        outer = json.loads(raw[:head_end] + raw[tail_start:])
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"{where}: unreadable index ({exc.__class__.__name__})") from None
    payload = outer.get("index") if isinstance(outer, dict) else None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION or payload.get("backups"):
        return None  # parsed whole: it says what is wrong
    if json_depth({k: v for k, v in payload.items() if k != "backup_summary"}) > MAX_JSON_DEPTH:  # checked flat below
        raise IntegrityError(f"{where}: unreadable index (nested too deeply)")
    told = payload.get("backup_summary")
    if not isinstance(told, dict):
        return None  # written before summaries
    ids, finished, pending = told.get("backup_ids"), told.get("finished_us"), told.get("pending")
    if (not isinstance(ids, list) or not isinstance(finished, list) or not isinstance(pending, list)
            or len(ids) != len(finished) or not set(map(type, finished)) <= {int} or not _backup_ids(ids)
            or pending and not set(pending) <= set(ids)):
        raise IntegrityError(f"{where}: unreadable index (its backup summary)")
    if not all(map(operator.lt, ids, ids[1:])) or "-" in "".join(ids):  # not in order, or not only plain ids
        keys = [backup_id_sort_key(backup_id) for backup_id in ids]
        if not all(map(operator.lt, keys, keys[1:])):
            return None  # parsed whole: sorted there, a backup listed twice refused
    return Entries(raw, head_end + 1, tail_start, ids, finished, set(pending), job, where), payload
