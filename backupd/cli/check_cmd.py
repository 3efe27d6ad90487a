"""backupd check [JOB]: configuration, keys, storage round trip, driver's own checks."""

from __future__ import annotations

import argparse
import io
import uuid
from typing import Callable, Iterable

from backupd import age
from backupd.cli.common import config_path, settings_from
from backupd.context import JobContext, open_storage
from backupd.driver import Check
from backupd.errors import BackupdError
from backupd.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("check", help="check configuration, tools, connectivity, storage and keys")
    parser.add_argument("job", nargs="?")
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
    key = f".backupd-check/{uuid.uuid4().hex}"
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

    yield _guard("encryption.identity_file", identity)


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
    checks.extend(key_checks(settings))
    for storage in sorted({settings.job(job).storage for job in jobs} or set(settings.storage)):
        checks.append(_guard(f"storage.{storage}", lambda s=storage: storage_round_trip(settings, s)))
    for job in jobs:
        ctx = JobContext(settings, job)
        try:
            checks.append(sandbox_check(ctx))
            for check in ctx.driver.check():
                check.name = f"jobs.{job}: {check.name}"
                checks.append(check)
        except BackupdError as exc:
            checks.append(Check(f"jobs.{job}", False, str(exc)))
        finally:
            ctx.close()
    for check in checks:
        status = "ok  " if check.ok and not check.warning else ("warn" if check.ok else "FAIL")
        print(f"{status}  {check.name}" + (f": {check.detail}" if check.detail else ""))
    return 0 if all(check.ok for check in checks) else 1
