"""The daemon's catch-up: repositories of a job that missed objects get them copied from one that has them.

Every ``interval`` seconds one thread lists each storage of each job (``backupd_storage_up``),
works out what each repository of a job with several lacks (``backupd_copy_behind_objects``,
``backupd_copy_behind_seconds``) and copies it, oldest first, from the job's other reachable
repositories in list order (``backupd.catchup``). A repository that cannot be listed is judged
against its last listing seen, so its backlog keeps growing in the metrics while it is down.
Storage errors are logged, never fatal; the next turn resumes where this one stopped.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Callable

import structlog

from backupd import metrics
from backupd.catchup import Listing, Manifests, for_target, measure
from backupd.context import JobContext
from backupd.errors import StorageError
from backupd.repository import Layout
from backupd.settings import Settings

log = structlog.get_logger(__name__)


class CopyWatch:
    def __init__(self, settings: Callable[[], Settings], interval: float) -> None:
        self._settings = settings
        self.interval = interval
        self._last: dict[tuple[str, str], Listing] = {}
        self._manifests: dict[str, Manifests] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="copy-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
            settings = self._settings()
            for job in sorted(settings.jobs):
                if self._stopping():
                    return
                try:
                    with structlog.contextvars.bound_contextvars(job=job, task="copy"):
                        self.turn(settings, job)
                except Exception as exc:  # noqa: BLE001 - one job's trouble must not stop the others'
                    log.warning("catch-up turn failed", job=job, error=str(exc))
            with self._cond:
                if not self._stop:
                    self._cond.wait(self.interval)

    def _stopping(self) -> bool:
        with self._cond:
            return self._stop

    def turn(self, settings: Settings, job: str) -> None:
        """One pass over the job: list, measure, copy what is missing, measure again."""
        ctx = JobContext(settings, job)
        contexts = {name: ctx.for_storage(name) for name in ctx.job.storages}
        try:
            if len(contexts) < 2:
                self._probe(contexts)
                return
            manifests = self._manifests.setdefault(job, Manifests(job))
            listings = self._list(job, contexts)
            self._measure(job, contexts, listings, manifests)
            copied = False
            for name, target in contexts.items():
                if name not in listings or self._stopping():
                    continue
                sources = {other: c.storage for other, c in contexts.items() if other != name and other in listings}
                if not sources:
                    continue
                copier = for_target(target, sources, manifests)
                plan = copier.plan()
                if not plan:
                    continue
                log.info("catching a repository up", storage=name, objects=sum(len(u.keys) for u in plan))
                try:
                    result = copier.run(plan)
                except StorageError as exc:
                    metrics.STORAGE_UP.labels(name).set(0)
                    log.warning("catch-up stopped: the repository cannot be written", storage=name, error=str(exc))
                    continue
                copied = copied or bool(result.copied)
                log.info("repository caught up" if not result.failed else "repository partly caught up",
                         storage=name, copied=len(result.copied), bytes=result.bytes, failed=len(result.failed))
            if copied:
                self._measure(job, contexts, self._list(job, contexts), manifests)
        finally:
            for one in contexts.values():
                one.close()
            ctx.close()

    def _probe(self, contexts: dict[str, JobContext]) -> None:
        """``backupd_storage_up`` of a job's only storage: one small listing."""
        for name, one in contexts.items():
            try:
                next(iter(one.storage.list(Layout(one.name).state_prefix)), None)
            except StorageError as exc:
                metrics.STORAGE_UP.labels(name).set(0)
                log.warning("storage not reachable", storage=name, error=str(exc))
                continue
            metrics.STORAGE_UP.labels(name).set(1)

    def _list(self, job: str, contexts: dict[str, JobContext]) -> dict[str, Listing]:
        listings = {}
        for name, one in contexts.items():
            try:
                listings[name] = Listing.read(one.storage, job)
            except StorageError as exc:
                metrics.STORAGE_UP.labels(name).set(0)
                log.warning("repository not reachable", storage=name, error=str(exc))
                continue
            metrics.STORAGE_UP.labels(name).set(1)
            self._last[(job, name)] = listings[name]
        return listings

    def _measure(self, job: str, contexts: dict[str, JobContext], listings: dict[str, Listing],
                 manifests: Manifests) -> None:
        """Behind per repository; one not reachable now is judged by its last listing (empty if never seen)."""
        last = {name: self._last[(job, name)] for name in contexts if (job, name) in self._last}
        now = dt.datetime.now(dt.timezone.utc)
        for name, lag in measure(contexts, listings, manifests, last).items():
            metrics.COPY_BEHIND_OBJECTS.labels(job, name).set(lag.objects)
            metrics.COPY_BEHIND_SECONDS.labels(job, name).set(lag.seconds(now))
