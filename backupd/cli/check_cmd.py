"""backupd check [JOB]: configuration, keys, storage round trip, driver's own checks."""

from __future__ import annotations

import argparse
import functools
import io
import os
import stat
import uuid
from pathlib import Path
from typing import Callable, Iterable

from backupd import age, sshsig
from backupd.cli.common import config_path, print_json, settings_from
from backupd.context import JobContext, open_storage
from backupd.driver import Check
from backupd.errors import BackupdError
from backupd.repository import Layout
from backupd.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("check", help="check configuration, tools, connectivity, storage and keys")
    parser.add_argument("job", nargs="?")
    parser.add_argument("--json", action="store_true", help="the checks as a JSON document")
    parser.set_defaults(handler=run)


def _guard(name: str, func: Callable[[], str | None]) -> Check:
    try:
        return Check(name, True, func() or "")
    except BackupdError as exc:
        return Check(name, False, str(exc))
    except Exception as exc:  # a check reports, it does not crash
        return Check(name, False, f"{type(exc).__name__}: {exc}")


def storage_round_trip(settings: Settings, name: str) -> str:
    payload = uuid.uuid4().bytes * 64
    key = Layout.probe_key(uuid.uuid4().hex)
    with open_storage(settings, name) as storage:
        storage.put(key, io.BytesIO(payload))
        try:
            with storage.open(key) as handle:
                if handle.read() != payload:
                    raise BackupdError(f"{storage.location}: read back different bytes than written")
            if storage.stat(key).size != len(payload):
                raise BackupdError(f"{storage.location}: stat reports the wrong size")
        finally:
            storage.delete(key)
        return f"{storage.location}: write, read, stat, delete ok"


def secret_file_mode(path: Path, what: str) -> str:
    """A secret file must be its owner's alone: BackupdError naming the file and its mode otherwise."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        raise BackupdError(f"{what} {path}: file not found") from None
    except PermissionError:
        raise BackupdError(f"{what} {path}: permission denied") from None
    if mode & 0o077:
        raise BackupdError(f"{what} {path} is accessible by group or others (mode {mode:04o}); "
                           f"run `chmod 600 {path}`")
    return f"{path}: mode {mode:04o}"


def key_checks(settings: Settings) -> Iterable[Check]:
    recipients = settings.encryption.recipients
    yield _guard("encryption.recipients", lambda: f"{len(recipients)} recipient(s) valid" if
                 all(age.parse_recipient(r) for r in settings.encryption.require_recipients("backing up")) else None)
    path = settings.encryption.identity_file
    if path is None:
        yield Check("encryption.identity_file", True, "not set (fine on a host that only backs up)", warning=True)
        return

    def identity() -> str:
        ctx = JobContext(settings, "")
        own = {str(i.to_recipient()) for i in ctx.identities}
        if not own & set(recipients):
            raise BackupdError(f"{path}: no identity in it matches any configured recipient; restores would fail")
        return f"{path}: matches a configured recipient"

    yield _guard("encryption.identity_file mode", lambda: secret_file_mode(path, "identity file"))
    yield _guard("encryption.identity_file", identity)


def signing_check(settings: Settings) -> Check:
    """One line on the signing key: readable, the owner's alone, and trusted by this configuration."""
    path = settings.signing.key_file
    trusted = settings.signing.public_keys()
    if path is None:
        detail = ("not set: backups and logs written here are not signed" if not trusted else
                  f"not set (fine on a host that only reads; {len(trusted)} trusted key(s))")
        return Check("signing.key_file", True, detail, warning=not trusted)

    def key() -> str:
        mode = secret_file_mode(path, "signing key")
        public = sshsig.load_private_key(path).public
        if not trusted:
            raise BackupdError(f"{path}: its public key is not in signing.trusted_keys (empty), so no signature "
                               f"is checked here; add {public.line()!r}")
        if public not in trusted:
            raise BackupdError(f"{path}: its public key {public} is not in signing.trusted_keys; backups "
                               f"signed here would be refused: add {public.line()!r}")
        return f"{mode}, {trusted[trusted.index(public)]}, trusted"  # as configured, with its comment

    return _guard("signing.key_file", key)


def signatures_check(ctx: JobContext) -> Check:
    """One line on whether the job's backups are signed; a warning when they are not, or would not be."""
    name = f"jobs.{ctx.name}: signatures"
    try:
        detail, warning = _signatures(ctx)
    except BackupdError as exc:
        return Check(name, False, str(exc))
    return Check(name, True, detail, warning=warning)


def _signatures(ctx: JobContext) -> tuple[str, bool]:
    """(what to say, whether it is a warning): this host's key against the job's trusted keys, then,
    with trusted keys, the job's backups in the repository, newest first."""
    key_file = ctx.settings.signing.key_file
    trusted = ctx.settings.trusted_keys(ctx.name)
    if not trusted:
        if key_file is None:
            return ("backups are not signed and signatures are not checked (no signing.key_file, no "
                    "trusted_keys): anyone who can write the repository can forge a backup", True)
        return "backups are signed here but not checked (no trusted_keys): a forged backup would be used", True
    if key_file is None and (ctx.job.schedule is not None or ctx.job.archive_logs):
        return ("this host writes the job's backups or logs unsigned (no signing.key_file) while trusted_keys "
                "is set: restore, verify and prune will refuse them", True)
    if key_file is not None:
        own = sshsig.load_private_key(key_file).public
        if own not in trusted:
            return (f"{key_file}: its public key {own} is not among the job's trusted keys: backups signed "
                    "here will be refused", True)
    entries = ctx.repository.entries()  # newest first, from the index
    if not entries:
        return f"no backups yet; {len(trusted)} trusted key(s)", False
    untrusted = [(m, trust) for m, trust in entries if trust is not None and trust.status != "signed"]
    newest = f"the newest, {entries[0][0].backup_id}, is {entries[0][1]}"
    if not untrusted:
        return f"{len(entries)} backup(s), all signed by a trusted key ({newest})", False
    first, trust = untrusted[0]
    return (f"{len(untrusted)} of {len(entries)} backup(s) not signed by a trusted key ({newest}; "
            f"{first.backup_id}: {trust}: {trust.problem})", True)


def state_dir_check(settings: Settings) -> Check:
    """Warn when the state directory (spool, control socket, audit log) is open to others."""
    path = settings.daemon.state_dir
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return Check("daemon.state_dir", True, f"{path}: not created yet (backupd creates it 0700)")
    except OSError as exc:
        return Check("daemon.state_dir", False, f"{path}: {exc.strerror}")
    if mode & 0o077:
        return Check("daemon.state_dir", True, f"{path} is accessible by group or others (mode {mode:04o}); "
                     f"backupd creates it 0700: run `chmod 700 {path}`", warning=True)
    return Check("daemon.state_dir", True, f"{path}: mode {mode:04o}")


def password_file_checks(settings: Settings, job: str) -> Iterable[Check]:
    path = getattr(settings.driver_options(job), "password_file", None)
    if path is not None:
        yield _guard(f"jobs.{job}.password_file mode", lambda: secret_file_mode(Path(path), "password file"))


def sandbox_check(ctx: JobContext) -> Check:
    """Whether verification's scratch servers can run sandboxed (or are explicitly unsandboxed)."""
    name = f"jobs.{ctx.name}: verify sandbox"
    try:
        ok, detail = ctx.driver.context.sandbox.describe(ctx.driver.scratch_user())
    except BackupdError as exc:
        return Check(name, False, str(exc))
    return Check(name, ok, detail, warning=ctx.job.verify.sandbox == "off")


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    checks: list[Check] = [Check("config", True, f"{config_path(args)}: valid")]
    jobs = [args.job] if args.job else sorted(settings.jobs)
    for job in jobs:
        settings.job(job)
    checks.append(state_dir_check(settings))
    checks.extend(key_checks(settings))
    checks.append(signing_check(settings))
    for storage in sorted({name for job in jobs for name in settings.job(job).storages} or set(settings.storage)):
        checks.append(_guard(f"storage.{storage}", functools.partial(storage_round_trip, settings, storage)))
    for job in jobs:
        checks.extend(password_file_checks(settings, job))
        ctx = JobContext(settings, job)
        try:
            checks.append(sandbox_check(ctx))
            checks.append(signatures_check(ctx))
            for check in ctx.driver.check():
                check.name = f"jobs.{job}: {check.name}"
                checks.append(check)
        except BackupdError as exc:
            checks.append(Check(f"jobs.{job}", False, str(exc)))
        finally:
            ctx.close()
    ok = all(check.ok for check in checks)
    if args.json:
        print_json({"ok": ok, "checks": [{"name": c.name, "status": _status(c), "ok": c.ok, "detail": c.detail}
                                         for c in checks]})
        return 0 if ok else 1
    for check in checks:
        print(f"{_status(check).upper() if not check.ok else _status(check):<4}  {check.name}"
              + (f": {check.detail}" if check.detail else ""))
    return 0 if ok else 1


def _status(check: Check) -> str:
    return "warn" if check.ok and check.warning else "ok" if check.ok else "fail"
