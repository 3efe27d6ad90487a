"""The bubblewrap sandbox that scratch servers and restored content run in.

Verification restores content an attacker may have written (a database user's
functions, a bucket writer's objects) and starts a server on it. Inside the
sandbox that server sees a read-only /usr, a handful of /etc files, its scratch
directory (the only writable place) and nothing else of the host: no production
data directory, no identity, password or signing key files, no state_dir, spool
or control socket, no network (a private loopback only), its own PID and IPC
namespaces (no /proc of host processes), a clean environment, and it dies with
backupd. When backupd runs as root, the server runs as an unprivileged OS user.

``verify.sandbox = "off"`` runs the same argv without bubblewrap (still as the
unprivileged user); it must be chosen explicitly.

Sandboxed or not, every scratch process runs with oom_score_adj 1000 (under memory
pressure the kernel kills it first, never the production server beside it) and an
RLIMIT_DATA of ``verify.memory_limit`` (default half the host's memory): content that
allocates without end gets an allocation failure inside the scratch server, which
verification reports, before the host swaps or its OOM killer acts. RLIMIT_DATA counts
private writable memory, not shared memory such as PostgreSQL's shared_buffers.
"""

from __future__ import annotations

import functools
import os
import pwd
import resource
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Sequence

from backupd.errors import DriverError

SandboxMode = Literal["bwrap", "off"]

#: The /etc entries a database server and its tools need (user lookups, the dynamic linker,
#: time zones, /usr/bin links through alternatives); the rest of /etc stays out of view.
ETC_ENTRIES = ("passwd", "group", "nsswitch.conf", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime",
               "timezone", "alternatives", "hosts", "host.conf", "locale.alias", "locale.conf", "mime.types")
SYSTEM_TREES = ("/usr",)
USR_LINKS = (("usr/bin", "/bin"), ("usr/sbin", "/sbin"), ("usr/lib", "/lib"), ("usr/lib64", "/lib64"),
             ("usr/lib32", "/lib32"), ("usr/libx32", "/libx32"))
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
HINT = ("install bubblewrap (Debian: bubblewrap) and allow unprivileged user namespaces, "
        "or set verify.sandbox = \"off\" for this job to run scratch servers unsandboxed")
#: Every scratch process's oom_score_adj: the first the OOM killer takes.
OOM_SCORE_ADJ = 1000
LIMITS_HINT = "install util-linux (Debian: util-linux), which has prlimit and choom"


class SandboxUnavailable(DriverError):
    """bubblewrap is missing or cannot create its namespaces here, or prlimit/choom are missing."""


def unprivileged_user(preferred: str | None, defaults: Sequence[str] = ()) -> str | None:
    """The OS user a scratch server runs as: None (ourselves) unless we are root.

    As root: ``preferred`` (the job's ``os_user``), else the first of ``defaults`` that
    exists, else ``nobody``; never root.
    """
    if os.geteuid() != 0:
        return None
    for name in ([preferred] if preferred else []) + list(defaults) + ["nobody"]:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            if name == preferred:
                raise DriverError(f"OS user {name!r} does not exist (set the job's os_user)") from None
            continue
        if entry.pw_uid == 0:
            raise DriverError(f"scratch servers never run as root (the job's os_user is {name!r})")
        return name
    raise DriverError("no unprivileged OS user to run scratch servers as (set the job's os_user)")


def chown_to(path: Path, user: str | None) -> None:
    """Give ``path`` and everything below it to ``user`` (root only; a no-op for None)."""
    if user is None or os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


@dataclass(frozen=True)
class Sandbox:
    """How to run one scratch server's processes: its writable directories, extra read-only ones, its user."""

    writable: tuple[Path, ...]
    user: str | None = None
    readable: tuple[Path, ...] = ()
    hidden: tuple[Path, ...] = ()
    enabled: bool = True
    env: tuple[tuple[str, str], ...] = field(default=())
    #: RLIMIT_DATA of every process it runs, which also get oom_score_adj 1000, bubblewrap or not;
    #: None (servers that are not scratch servers: the tests' primaries): neither.
    memory_limit: int | None = None

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside this sandbox (as ``user`` when backupd is root)."""
        prefix = ["runuser", "-u", self.user, "--"] if self.user and os.geteuid() == 0 else []
        if self.memory_limit is not None:
            prefix += bounds_argv(self.memory_limit)
        if not self.enabled:
            return [*prefix, *argv]
        return [*prefix, *bwrap_argv(self), "--", *argv]

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A clean environment: nothing of backupd's own (cloud credentials, BACKUPD_* overrides) leaks in."""
        home = str(self.writable[0]) if self.writable else "/tmp"
        env = {"PATH": PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC"}
        if self.user:
            env.update(USER=self.user, LOGNAME=self.user)
        env.update(dict(self.env))
        env.update(extra or {})
        return env


def bwrap_argv(sandbox: Sandbox) -> list[str]:
    argv = [bwrap_path(), "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run", "--dir", "/var/tmp"]
    for tree in SYSTEM_TREES:
        argv += ["--ro-bind", tree, tree]
    for target, link in USR_LINKS:
        if Path("/" + target).exists():
            argv += ["--symlink", target, link]
    for name in ETC_ENTRIES:
        argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for path in sandbox.readable:
        argv += ["--ro-bind", str(path), str(path)]
    for path in sandbox.writable:
        argv += ["--bind", str(path), str(path)]
    for path in sandbox.hidden:
        trees = [Path(tree) for tree in SYSTEM_TREES] + list(sandbox.readable) + list(sandbox.writable)
        if any(_inside(path, tree) for tree in trees):
            argv += ["--tmpfs", str(path)] if path.is_dir() else ["--ro-bind", "/dev/null", str(path)]
    return argv


def _inside(path: Path, tree: Path) -> bool:
    return path == tree or tree in path.parents


@functools.lru_cache(maxsize=None)
def bwrap_path() -> str:
    path = shutil.which("bwrap")
    if not path:
        raise SandboxUnavailable("bwrap: not found on PATH; verification runs scratch servers in a bubblewrap sandbox",
                                 hint=HINT)
    return path


def bounds_argv(memory_limit: int) -> list[str]:
    """prlimit and choom, run as the scratch user (lowering a limit, raising oom_score_adj need no privilege).

    A lower hard limit backupd already runs under (``LimitDATA=`` of its unit) is kept: the
    scratch user could not raise it, and prlimit would fail instead of starting the server.
    """
    prlimit, choom = limit_tools()
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    if hard != resource.RLIM_INFINITY:
        memory_limit = min(memory_limit, hard)
    return [prlimit, f"--data={memory_limit}:{memory_limit}", "--", choom, "-n", str(OOM_SCORE_ADJ), "--"]


@functools.lru_cache(maxsize=None)
def limit_tools() -> tuple[str, str]:
    """The paths of prlimit and choom (util-linux); SandboxUnavailable naming the one missing."""
    found = []
    for name in ("prlimit", "choom"):
        path = shutil.which(name)
        if not path:
            raise SandboxUnavailable(f"{name}: not found on PATH; verification bounds the memory of scratch servers "
                                     "with util-linux's prlimit and choom", hint=LIMITS_HINT)
        found.append(path)
    return found[0], found[1]


def host_memory_limit() -> int:
    """The default ``verify.memory_limit``: half the host's memory (MemTotal)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


@dataclass(frozen=True)
class SandboxPolicy:
    """The core's decision for a job: sandboxed or not, and the host paths that must never be visible."""

    mode: SandboxMode = "bwrap"
    hidden: tuple[Path, ...] = ()
    #: ``verify.memory_limit``; None: half the host's memory
    memory_limit: int | None = None

    @property
    def scratch_memory(self) -> int:
        """The RLIMIT_DATA every scratch process of this policy gets."""
        return self.memory_limit or host_memory_limit()

    def for_scratch(self, writable: Sequence[Path], *, user: str | None, readable: Sequence[Path] = (),
                    env: Mapping[str, str] | None = None) -> Sandbox:
        """A sandbox for one scratch server; SandboxUnavailable when bubblewrap (or prlimit, choom) cannot run here."""
        box = Sandbox(tuple(Path(p) for p in writable), user, tuple(Path(p) for p in readable), self.hidden,
                      self.mode == "bwrap", tuple((env or {}).items()), self.scratch_memory)
        if box.enabled:
            problem = probe(user)
            if problem:
                raise SandboxUnavailable(f"the verification sandbox cannot start: {problem}", hint=HINT)
        limit_tools()
        return box

    def describe(self, user: str | None = None) -> tuple[bool, str]:
        """For ``backupd check``: (usable, what it is)."""
        try:
            limit_tools()
        except SandboxUnavailable as exc:
            return False, str(exc)
        bounds = f"; memory limit {self.scratch_memory >> 20} MiB a process"
        if self.mode == "off":
            return True, "off (verify.sandbox = \"off\": scratch servers run unsandboxed)" + bounds
        problem = probe(user)
        if problem:
            return False, f"bwrap unavailable: {problem}"
        return True, f"bwrap ({bwrap_path()})" + bounds


@functools.lru_cache(maxsize=None)
def probe(user: str | None) -> str | None:
    """None when bubblewrap can build a sandbox here (as ``user``), else why not."""
    from backupd.tool import run

    try:
        run(Sandbox((), user).wrap(["true"]), env={"PATH": PATH}, timeout=30, name="bwrap")
    except SandboxUnavailable as exc:
        return str(exc).split(";")[0]
    except DriverError as exc:
        return str(exc)
    return None
