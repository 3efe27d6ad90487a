"""The daemon's main thread: lock, start, serve, reload on SIGHUP, drain on SIGTERM.

Signal handlers only set Events; the main thread acts on them. Shutdown stops
scheduling, lets running jobs finish for up to ``daemon.shutdown_timeout``, then
aborts them through their cancel Events (a second signal aborts at once) and
exits 0 once every run has stopped cleanly.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from backupd import __version__, children, metrics, plugins, pushes
from backupd.context import JobContext, open_storage
from backupd.control import ControlServer, confine, job_peers, socket_path
from backupd.daemon.httpserver import MetricsServer
from backupd.daemon.metrics import CONFIG_RELOADS, DAEMON_START
from backupd.daemon.notify import Notifier
from backupd.daemon.copywatch import CopyWatch
from backupd.daemon.repo_metrics import RepositoryWatch
from backupd.daemon.runs import Runs, Slots
from backupd.daemon.scheduler import Scheduler
from backupd.daemon.state import DaemonLock, ScheduleState
from backupd.daemon.supervisor import Supervised
from backupd.daemon.tasks import Tasks
from backupd.errors import ConfigError
from backupd.jobrun import JobRun, MetricsRecorder
from backupd.migrate import kinds_of, migrate_in_background
from backupd.settings import Settings, load_settings
from backupd.timeutil import format_timestamp

log = structlog.get_logger(__name__)

TICK = 0.2  # main loop resolution (signals, reload, watchdog)
ABORT_GRACE = 30.0  # after aborting, how long runs get to clean up (abort uploads, kill children)
ARCHIVER_STOP = 10.0


class Daemon:
    def __init__(self, settings: Settings, config_path: Path) -> None:
        self.settings = settings
        self.config_path = config_path
        self.state_dir = settings.daemon.state_dir
        self.stop_event = threading.Event()
        self.abort_event = threading.Event()
        self.reload_event = threading.Event()
        self.notifier = Notifier()
        self.runs = Runs()
        self.slots = Slots(settings.daemon.max_parallel_jobs)
        self.lock = DaemonLock(self.state_dir)
        self.contexts: dict[str, JobContext] = {}
        self.job_handlers: dict[str, dict[str, Any]] = {}
        self.archivers: dict[str, list[Supervised]] = {}
        self.signatures: dict[str, str] = {}
        self.recorder = MetricsRecorder()

    # -- life cycle ----------------------------------------------------------
    def run(self) -> int:
        self.lock.acquire()
        try:
            return self._serve()
        finally:
            self.lock.release()

    def _serve(self) -> int:
        self._install_signals()
        self.state = ScheduleState(self.state_dir)
        self.tasks = Tasks(lambda: self.settings, self.runs, self.slots, self.state)
        self.scheduler = Scheduler(self.tasks, self.state, self.settings.daemon.timezone)
        self.http = MetricsServer(self.settings.daemon.metrics_listen, self.health)
        self.control = ControlServer(socket_path(self.state_dir), {})
        self.watch = RepositoryWatch(lambda: self.settings,
                                     self.settings.daemon.repository_poll_interval.total_seconds())
        self.copies = CopyWatch(lambda: self.settings, self.settings.daemon.repository_poll_interval.total_seconds())
        self._load_jobs(self.settings)
        self.scheduler.apply(self.settings)
        self.http.start()
        self.control.start()
        self.scheduler.start()
        DAEMON_START.set(time.time())
        self.watch.start(sorted(self.settings.jobs))
        self.copies.start()
        self._migrate()
        log.info("daemon started", version=__version__, pid=os.getpid(), jobs=sorted(self.settings.jobs),
                 metrics=self.settings.daemon.metrics_listen, state_dir=str(self.state_dir))
        self.notifier.ready(self.status_line())
        while not self.stop_event.wait(TICK):
            if self.reload_event.is_set():
                self.reload_event.clear()
                self.reload()
            if self.scheduler.alive:
                self.notifier.watchdog()  # a dead scheduler stops the pings: systemd restarts us
        return self._shutdown()

    def _install_signals(self) -> None:
        def on_stop(signum: int, _frame: Any) -> None:
            if self.stop_event.is_set():
                self.abort_event.set()
            self.stop_event.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, lambda *_: self.reload_event.set())

    def _shutdown(self) -> int:
        timeout = self.settings.daemon.shutdown_timeout.total_seconds()
        running = [run.job_id for run in self.runs.active()]
        log.info("stopping: no new runs", running=running, drain_timeout=timeout)
        self.notifier.stopping(f"stopping; draining {len(running)} run(s)")
        self.runs.stopping = True
        self.slots.close()
        self.scheduler.stop_scheduling()
        deadline = time.monotonic() + timeout
        while not self.runs.wait_idle(TICK):
            if self.abort_event.is_set() or time.monotonic() >= deadline:
                reason = "second signal" if self.abort_event.is_set() else "shutdown timeout"
                log.warning("aborting running jobs", reason=reason, running=[r.job_id for r in self.runs.active()])
                self.runs.abort_all(reason)
                self.runs.wait_idle(ABORT_GRACE)
                break
        for supervised in self.supervisors:
            if not supervised.stop(ARCHIVER_STOP):
                log.error("log archiver did not stop in time", archiver=supervised.name)
        for pid, name in children.kill_all():
            log.warning("terminated a leftover child process", pid=pid, command=name)
        self.watch.stop()
        self.copies.stop()
        self.control.stop()
        self.http.stop()
        for ctx in self.contexts.values():
            ctx.close()
        stuck = [run.job_id for run in self.runs.active()]
        if stuck:
            log.error("runs did not stop after being aborted; exiting anyway", runs=stuck)
            sys.stderr.flush()
            self.lock.release()
            os._exit(1)  # the stuck threads would keep the interpreter from exiting
        log.info("daemon stopped")
        return 0

    # -- jobs, archivers, control handlers ----------------------------------
    def _migrate(self) -> None:
        """Move each job's repository from an older layout, once, in the background (``backupd migrate``)."""
        repositories = []
        for name in sorted(self.settings.jobs):
            kinds = kinds_of(self.settings.job(name).driver)
            for storage in self.settings.job(name).storages if kinds else []:
                try:
                    repositories.append((name, open_storage(self.settings, storage), kinds))
                except Exception as exc:  # reads keep finding the old layout; the next start tries again
                    log.error("cannot open the job's storage to migrate it", job=name, storage=storage,
                              error=str(exc))
        migrate_in_background(repositories)

    @property
    def supervisors(self) -> list[Supervised]:
        return [supervised for group in self.archivers.values() for supervised in group]

    def _load_jobs(self, settings: Settings) -> list[str]:
        """Contexts, control handlers and log archivers for ``settings``; returns the jobs (re)loaded.

        A job whose settings (and storage, encryption, archiver backoff) are unchanged keeps its
        context and its running archivers: a reload that changes nothing restarts nothing, and the
        archive lag it reports carries on. A changed job's archivers are stopped, then started anew;
        a job whose driver could not be set up is tried again.
        """
        old_contexts, old_handlers = dict(self.contexts), dict(self.job_handlers)
        old_archivers, old_signatures = dict(self.archivers), dict(self.signatures)
        contexts: dict[str, JobContext] = {}
        handlers: dict[str, dict[str, Any]] = {}
        archivers: dict[str, list[Supervised]] = {}
        signatures: dict[str, str] = {}
        loaded: list[str] = []
        backoff = settings.daemon.archiver_backoff_max.total_seconds()
        for name, job in sorted(settings.jobs.items()):
            signatures[name] = job_signature(settings, name)
            if old_signatures.get(name) == signatures[name] and name in old_handlers:  # set up, unchanged
                contexts[name] = old_contexts.pop(name)
                archivers[name] = old_archivers.pop(name, [])
                handlers[name] = old_handlers[name]
                continue
            self._retire(name, old_contexts, old_archivers)
            loaded.append(name)
            ctx = JobContext(settings, name)
            contexts[name] = ctx
            try:
                descriptor = plugins.driver_descriptor(job.driver)
                metrics.declare_job(name, descriptor.methods, archives_logs=job.archive_logs,
                                    capabilities=descriptor.capabilities)
                metrics.declare_storages(name, job.storages)
                driver = ctx.driver
                handlers[name] = dict(driver.control_handlers())
                found = driver.log_archivers() if job.archive_logs else []
            except Exception as exc:  # one broken job must not take the others down
                log.error("job's driver could not be set up; its archivers and control ops are off",
                          job=name, error=str(exc))
                continue
            archivers[name] = [Supervised(name, archiver, backoff) for archiver in found]
        for name in list(old_contexts):  # jobs the new settings no longer have
            self._retire(name, old_contexts, old_archivers)
            metrics.forget_job(name)
            log.info("job removed", job=name)
        self.contexts, self.job_handlers, self.archivers, self.signatures = contexts, handlers, archivers, signatures
        peers = {os.geteuid(), 0}  # the control socket serves us, root and the clusters' OS users
        for name, job in settings.jobs.items():
            peers |= job_peers(job.os_user, self._data_dir(name))
        self.control.peers = frozenset(peers)
        ops = {op for table in handlers.values() for op in table}
        self.control.handlers = {op: self._dispatcher(op) for op in ops} | {"status": self._status_op}
        for name in loaded:
            for supervised in archivers.get(name, []):
                supervised.start()
        return loaded

    @staticmethod
    def _retire(name: str, contexts: dict[str, JobContext], archivers: dict[str, list[Supervised]]) -> None:
        """Stop a job's archivers (dropping their series) and close its context."""
        for supervised in archivers.pop(name, []):
            if not supervised.stop(ARCHIVER_STOP):
                log.error("log archiver did not stop in time", archiver=supervised.name)
            supervised.forget()
        ctx = contexts.pop(name, None)
        if ctx is not None:
            ctx.close()

    def _dispatcher(self, op: str):
        def dispatch(message: dict[str, Any]) -> dict[str, Any]:
            job = message.get("job")
            if not job:
                serving = sorted(name for name, table in self.job_handlers.items() if op in table)
                if len(serving) != 1:
                    return {"ok": False, "error": f"op {op!r} needs a job: served by {', '.join(serving) or 'none'}"}
                job = serving[0]
            handler = self.job_handlers.get(job, {}).get(op)
            if handler is None:
                return {"ok": False, "error": f"job {job!r} does not serve {op!r} in this daemon"}
            if "path" in message:  # a file the daemon is to read: only inside the job's own data directory
                data_dir = self._data_dir(job)
                if data_dir is None:
                    return {"ok": False, "error": f"{op}: job {job} has no data_dir; file requests are refused"}
                try:
                    message = {**message, "path": str(confine(message["path"], data_dir))}
                except ValueError as exc:
                    log.warning("control request refused", op=op, job=job, error=str(exc))
                    return {"ok": False, "error": f"{op} refused: {exc}"}
            run = JobRun(op, job, trigger="control", ctx=self.contexts.get(job), recorder=self.recorder)
            with run.bound(op=op):
                try:
                    return handler(message)
                except Exception as exc:  # every failure becomes a reply; the client decides what to do
                    log.warning("control request failed", error=run.describe(exc))
                    return {"ok": False, "error": run.describe(exc)}

        return dispatch

    def _data_dir(self, job: str) -> Path | None:
        try:
            data_dir = getattr(self.settings.driver_options(job), "data_dir", None)
        except KeyError:
            return None
        return Path(data_dir) if data_dir is not None else None

    def _status_op(self, _message: dict[str, Any]) -> dict[str, Any]:
        """Health, and each archiving job's live lag (for `backupd status`)."""
        healthy, details = self.health()
        lags = {job: metrics.REGISTRY.get_sample_value("backupd_archive_lag_seconds", {"job": job})
                for job in self.contexts}
        return {"ok": True, "healthy": healthy, "pid": os.getpid(), **details,
                "archive_lag": {job: lag for job, lag in lags.items() if lag is not None}}

    # -- reload ----------------------------------------------------------------
    def reload(self) -> None:
        self.notifier.reloading()
        log.info("reloading the configuration", path=str(self.config_path))
        try:
            new = load_settings(self.config_path)
            if new.daemon.state_dir != self.settings.daemon.state_dir:
                raise ConfigError("daemon.state_dir cannot change while the daemon runs",
                                  errors=[f"daemon.state_dir: restart the daemon to change it (got {new.daemon.state_dir})"])
        except ConfigError as exc:
            CONFIG_RELOADS.labels("failure").inc()
            log.error("configuration reload failed; the running configuration stays", error=str(exc),
                      errors=exc.errors)
            self.notifier.ready(self.status_line() + "; last reload failed")
            return
        if new.daemon.metrics_listen != self.settings.daemon.metrics_listen:
            log.warning("daemon.metrics_listen changes on restart only", listening=self.settings.daemon.metrics_listen)
        self.settings = new
        loaded = self._load_jobs(new)
        self.slots.resize(new.daemon.max_parallel_jobs)
        self.scheduler.apply(new)
        self.watch.interval = new.daemon.repository_poll_interval.total_seconds()
        self.watch.warm_up(loaded)
        self.copies.interval = self.watch.interval
        self.copies.wake()
        CONFIG_RELOADS.labels("success").inc()
        log.info("configuration reloaded", jobs=sorted(new.jobs), reloaded=loaded,
                 scheduled=sorted(self.scheduler.specs))
        self.notifier.ready(self.status_line())

    # -- health ------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        reasons = []
        if self.stop_event.is_set():
            reasons.append("daemon is stopping")
        elif not self.scheduler.alive:
            reasons.append("scheduler is not running")
        archivers = []
        for supervised in self.supervisors:
            status = supervised.status()
            archivers.append(vars(status))
            if not supervised.healthy:
                reasons.append(f"log archiver {status.name} of job {status.job} is {status.state}"
                               + (f": {status.last_error}" if status.last_error else ""))
        for job, failing in sorted(pushes.failing().items()):
            if job in self.contexts:
                since = format_timestamp(dt.datetime.fromtimestamp(failing.since, dt.timezone.utc))
                reasons.append(f"log pushes of job {job} fail since {since} "
                               f"({failing.attempts} attempt(s)): {failing.error}")
        return not reasons, {
            "reasons": reasons,
            "scheduled": sorted(self.scheduler.specs),
            "running": sorted(run.job_id for run in self.runs.active()),
            "archivers": archivers,
        }

    def status_line(self) -> str:
        return f"{len(self.scheduler.specs)} scheduled job(s), {len(self.supervisors)} log archiver(s)"


def job_signature(settings: Settings, name: str) -> str:
    """What a job's context, control handlers and log archivers are built from: equal, nothing to restart.

    Tasks (backup, verify, prune) build their context from the current settings at each run,
    so they are not part of it (nor is the sandbox, which only they use)."""
    job = settings.job(name)
    parts = {
        "job": job.model_dump(mode="json"),
        "driver": settings.driver_options(name).model_dump(mode="json"),
        "storage": [settings.storage_options(storage).model_dump(mode="json") for storage in job.storages],
        "encryption": settings.encryption.model_dump(mode="json"),
        "archiver_backoff_max": settings.daemon.archiver_backoff_max.total_seconds(),
        "source": str(settings.source),
    }
    return json.dumps(parts, sort_keys=True, default=str)


def run_daemon(settings: Settings, config_path: Path) -> int:
    return Daemon(settings, config_path).run()
