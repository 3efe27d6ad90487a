"""Signed manifests in use: an attacker who can write the repository (filesystem or S3) but holds
no trusted signing key cannot make restore, verify, prune or "the newest backup" use what they wrote.

Each forgery is a complete backup as the attacker can make one: a manifest naming a stream that
is valid age to the job's recipient with the right size and sha256 (so it passes every check
but the signature). Jobs without trusted_keys behave as before (the rest of the suite).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from backupd import age, metrics, signing
from backupd.context import JobContext
from backupd.daemon.repo_metrics import refresh_backups
from backupd.settings import load_settings
from backupd.sshsig import SigningKey
from backupd.storage import Storage
from backupd.timeutil import parse_timestamp
from core_fixtures import Keys, Repo, make_sample_db, sqlite_job_config
from mysql_support import started
from signing_support import add_signing, forge_backup, read, signing_key_file
from support import error_lines, run_backupd
from test_mysql_driver import backup as mysql_backup, make_job, restore as mysql_restore, tools  # noqa: F401 (fixture)

HOST_A = SigningKey.generate("backupd@host-a")  # writes this job's backups
HOST_B = SigningKey.generate("backupd@host-b")  # another host of the same bucket: trusted, not for this job


@dataclass
class Signed:
    config: Path
    unsigned_config: Path  # the same job and repository, written by a host without a signing key
    storage: Storage  # the repository as the attacker sees it
    keys: Keys
    counts: dict[str, int]
    tmp: Path
    table: dict[str, object]  # the repository's storage table
    db: Path


@pytest.fixture
def signed(repository: Repo, tmp_path: Path, keys: Keys) -> Signed:
    db = tmp_path / "shop.sqlite3"
    counts = make_sample_db(db, rows=50)
    unsigned = sqlite_job_config(tmp_path, keys, repository.table, db, {"retention": {"keep_last": 1}})
    unsigned = unsigned.rename(tmp_path / "unsigned.toml")
    config = sqlite_job_config(tmp_path, keys, repository.table, db,
                               {"trusted_keys": [HOST_A.public.line()], "retention": {"keep_last": 1}})
    add_signing(config, [HOST_A.public.line(), HOST_B.public.line()],
                signing_key_file(tmp_path / "host-a.key", HOST_A))
    return Signed(config, unsigned, repository.storage, keys, counts, tmp_path, repository.table, db)


def backup(signed: Signed, config: Path | None = None) -> str:
    run_backupd("backup", "shop", config=config or signed.config, check=True)
    listing = run_backupd("list", "shop", "--json", config=signed.config, check=True)
    return json.loads(listing.out)["backups"][0]["backup_id"]


def forge(signed: Signed, *, after: str, rows: int = 7) -> tuple[str, bytes]:
    """A newer backup of the attacker's own database (``rows`` orders)."""
    evil = signed.tmp / f"evil-{rows}.sqlite3"
    make_sample_db(evil, rows=rows)
    return forge_backup(signed.storage, "shop", after, evil.read_bytes(), signed.keys.recipient, dt.timedelta(hours=1 + rows))


def rows_in(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM orders").fetchone()[0]


def signatures(signed: Signed) -> dict[str, str | None]:
    listing = run_backupd("list", "shop", "--json", config=signed.config, check=True)
    return {b["backup_id"]: b["signature"] for b in json.loads(listing.out)["backups"]}


def test_a_forged_unsigned_backup_is_refused_and_steers_nothing(signed: Signed) -> None:
    real = backup(signed)
    assert signed.storage.stat(f"shop/backups/{real}/manifest.json.sig").size > 0
    forged, _ = forge(signed, after=real)

    assert signatures(signed) == {forged: "unsigned", real: "signed-by backupd@host-a"}

    named = run_backupd("restore", "shop", "--to", str(signed.tmp / "named.sqlite3"), "--backup", forged,
                        config=signed.config)
    assert named.code == 1, named.err
    line = error_lines(named.err)[0]
    assert forged in line and "manifest.json.sig: missing" in line and "not trusted" in line
    assert not (signed.tmp / "named.sqlite3").exists()

    newest = signed.tmp / "newest.sqlite3"  # "the newest backup" is the newest trusted one
    run_backupd("restore", "shop", "--to", str(newest), config=signed.config, check=True)
    assert rows_in(newest) == signed.counts["orders"]

    for args in (["--integrity-only"], [], ["--backup", forged], ["--backup", forged, "--integrity-only"]):
        result = run_backupd("verify", "shop", "--json", *args, config=signed.config)
        assert result.code == 3, (args, result.out, result.err)
        problems = [p for r in json.loads(result.out)["reports"] for p in r["problems"]]
        assert any(forged in p and "not signed" in p for p in problems), (args, problems)

    plan = run_backupd("prune", "shop", "--dry-run", "--json", config=signed.config, check=True)
    document = json.loads(plan.out)
    assert [d["name"] for d in document["decisions"] if d["kind"] == "backup"] == [real]
    assert document["decisions"][0]["action"] == "keep"
    assert len(document["untrusted"]) == 1 and forged in document["untrusted"][0]
    text = run_backupd("prune", "shop", "--dry-run", config=signed.config, check=True).out
    assert f"untrusted, kept and not planned from: backup {forged}" in text

    run_backupd("prune", "shop", config=signed.config, check=True)  # keep_last = 1: the forgery is not "the last"
    assert set(signatures(signed)) == {real, forged}

    status = json.loads(run_backupd("status", "shop", "--json", config=signed.config).out)["jobs"][0]
    assert status["backups"]["count"] == 1 and status["backups"]["newest"][0]["backup_id"] == real
    assert [line.split(":")[0] for line in status["untrusted_objects"]] == [forged]
    assert any("not signed by a trusted key" in p for p in status["problems"])

    ctx = JobContext(load_settings(signed.config), "shop")  # the daemon's listing: the metric and the gauges
    try:
        assert refresh_backups(ctx) == 1
    finally:
        ctx.close()
    assert metrics.REPOSITORY_UNTRUSTED.labels("shop")._value.get() == 1  # noqa: SLF001
    newest = parse_timestamp(json.loads(read(signed.storage, f"shop/backups/{real}/manifest.json"))["finished_at"])
    gauge = metrics.BACKUP_LAST_SUCCESS.labels("shop", "logical", "full")._value.get()  # noqa: SLF001
    assert gauge == newest.timestamp()  # not the forgery's later time


def test_a_moved_signature_and_another_hosts_key_are_bad(signed: Signed) -> None:
    real = backup(signed)
    moved, _ = forge(signed, after=real, rows=3)
    signed.storage.put(f"shop/backups/{moved}/manifest.json.sig",
                       io.BytesIO(read(signed.storage, f"shop/backups/{real}/manifest.json.sig")))
    foreign, manifest = forge(signed, after=real, rows=5)
    signing.sign_manifest(signed.storage, f"shop/backups/{foreign}/manifest.json", manifest, HOST_B)

    assert signatures(signed) == {foreign: "BAD", moved: "BAD", real: "signed-by backupd@host-a"}
    table = run_backupd("list", "shop", config=signed.config, check=True).out.splitlines()
    column = table[0].index("SIGNATURE")
    assert {line.split()[0]: line[column:].strip() for line in table[1:]} == {
        foreign: "BAD", moved: "BAD", real: "signed-by backupd@host-a"}, table
    for forged, why in ((moved, "signature"), (foreign, HOST_B.public.fingerprint)):
        for allow in ([], ["--allow-unsigned"]):  # never accepted, not even with --allow-unsigned
            target = signed.tmp / f"{forged}.sqlite3"
            result = run_backupd("restore", "shop", "--to", str(target), "--backup", forged, *allow,
                                 config=signed.config)
            assert result.code == 1 and not target.exists(), result.err
            line = next(line for line in error_lines(result.err) if line.startswith("backupd: error"))
            assert forged in line and "manifest.json.sig" in line and why in line, line
        verify = run_backupd("verify", "shop", "--backup", forged, config=signed.config)
        assert verify.code == 3, verify.err
    show = run_backupd("show", foreign, "--job", "shop", config=signed.config, check=True)
    assert "signature   BAD" in show.out
    show = run_backupd("show", real, "--job", "shop", config=signed.config, check=True)
    assert "signature   signed-by backupd@host-a" in show.out


def test_unsigned_backups_need_allow_unsigned(signed: Signed) -> None:
    old = backup(signed, signed.unsigned_config)  # from before signing
    assert signatures(signed) == {old: "unsigned"}
    show = run_backupd("show", old, "--job", "shop", config=signed.config, check=True)
    assert "signature   unsigned" in show.out, show.out
    target = signed.tmp / "restored.sqlite3"
    refused = run_backupd("restore", "shop", "--to", str(target), config=signed.config)
    assert refused.code == 1 and not target.exists(), refused.err

    allowed = run_backupd("restore", "shop", "--to", str(target), "--allow-unsigned", config=signed.config)
    assert allowed.code == 0, allowed.err
    assert rows_in(target) == signed.counts["orders"]
    assert "WARNING: --allow-unsigned" in allowed.err
    assert "UNSIGNED backup" in allowed.err

    # Jobs without trusted keys read it as before, and list marks nothing.
    listing = run_backupd("list", "shop", "--json", config=signed.unsigned_config, check=True)
    assert json.loads(listing.out)["backups"][0]["signature"] is None


def signatures_check(config: Path) -> dict:
    result = run_backupd("check", "shop", "--json", config=config)
    return next(c for c in json.loads(result.out)["checks"] if c["name"] == "jobs.shop: signatures")


def test_check_warns_in_one_line_when_the_jobs_backups_are_not_signed(signed: Signed) -> None:
    assert signatures_check(signed.config) == {"name": "jobs.shop: signatures", "status": "ok", "ok": True,
                                               "detail": "no backups yet; 1 trusted key(s)"}
    real = backup(signed)
    check = signatures_check(signed.config)
    assert check["status"] == "ok", check
    assert check["detail"] == f"1 backup(s), all signed by a trusted key (the newest, {real}, is signed-by backupd@host-a)"

    newest = backup(signed, signed.unsigned_config)  # written by a host without a signing key
    check = signatures_check(signed.config)
    assert check["status"] == "warn" and check["ok"], check
    assert check["detail"].startswith(f"1 of 2 backup(s) not signed by a trusted key (the newest, {newest}, is "
                                      f"unsigned; {newest}: unsigned: shop/backups/{newest}/manifest.json.sig: "
                                      "missing"), check
    text = run_backupd("check", "shop", config=signed.config).out.splitlines()
    assert [line for line in text if "signatures" in line] == [f"warn  jobs.shop: signatures: {check['detail']}"]

    check = signatures_check(signed.unsigned_config)  # neither signed nor checked
    assert check["status"] == "warn" and "not signed and signatures are not checked" in check["detail"], check

    # a host that writes the job's backups on a schedule, trusts keys, but has no signing key of its own
    (signed.tmp / "writer").mkdir()
    writer = sqlite_job_config(signed.tmp / "writer", signed.keys, signed.table, signed.db,
                               {"schedule": "@daily", "trusted_keys": [HOST_A.public.line()]})
    add_signing(writer, [HOST_A.public.line()])
    check = signatures_check(writer)
    assert check["status"] == "warn", check
    assert check["detail"].startswith("this host writes the job's backups or logs unsigned (no signing.key_file)")

    # a host whose key is trusted, but not for this job
    (signed.tmp / "other").mkdir()
    other = sqlite_job_config(signed.tmp / "other", signed.keys, signed.table, signed.db,
                              {"trusted_keys": [HOST_A.public.line()]})
    add_signing(other, [HOST_A.public.line(), HOST_B.public.line()],
                signing_key_file(signed.tmp / "other" / "host-b.key", HOST_B))
    check = signatures_check(other)
    assert check["status"] == "warn", check
    assert check["detail"] == (f"{signed.tmp / 'other' / 'host-b.key'}: its public key ssh-ed25519 {HOST_B.public.fingerprint} is not among "
                               "the job's trusted keys: backups signed here will be refused")


# -- against a real MariaDB server: forged logical backups ------------------------------------------


def plaintext_stream(storage: Storage, job: str, backup_id: str, identity: age.X25519Identity) -> bytes:
    """A backup's (first) stream as the driver wrote it: what an attacker holding the job's identity
    would start a forgery from; one without it writes a dump of their own."""
    manifest = json.loads(read(storage, f"{job}/backups/{backup_id}/manifest.json"))
    stored = read(storage, f"{job}/backups/{backup_id}/{manifest['objects'][0]['key']}")
    return zstandard.ZstdDecompressor().decompressobj().decompress(age.decrypt([identity], stored))


@pytest.mark.usefixtures("tools")
def test_forged_mariadb_backups_are_refused_and_nothing_is_restored(repository: Repo, tmp_path: Path,
                                                                    keys: Keys) -> None:
    source, target = started(log_bin=True, server_id=41), started(log_bin=False, server_id=42)
    try:
        source.sql("CREATE DATABASE sig2", "CREATE TABLE sig2.t (id INT PRIMARY KEY)",
                   "INSERT INTO sig2.t VALUES (1), (2), (3)")
        job = make_job(tmp_path, keys, source, ["sig2"], storage=repository.table,
                       trusted_keys=[HOST_A.public.line()])  # host B's key is trusted, but not for this job
        add_signing(job.config, [HOST_A.public.line(), HOST_B.public.line()],
                    signing_key_file(tmp_path / "host-a.key", HOST_A))
        real = mysql_backup(job)
        storage = repository.storage
        evil = plaintext_stream(storage, "shop", real, keys.identity) + b"\nCREATE DATABASE pwned;\n"
        unsigned, _ = forge_backup(storage, "shop", real, evil, keys.recipient, dt.timedelta(hours=1))
        moved, _ = forge_backup(storage, "shop", real, evil, keys.recipient, dt.timedelta(hours=2))
        storage.put(f"shop/backups/{moved}/manifest.json.sig",
                    io.BytesIO(read(storage, f"shop/backups/{real}/manifest.json.sig")))
        foreign, manifest = forge_backup(storage, "shop", real, evil, keys.recipient, dt.timedelta(hours=3))
        signing.sign_manifest(storage, f"shop/backups/{foreign}/manifest.json", manifest, HOST_B)

        listing = json.loads(run_backupd("list", "shop", "--json", config=job.config, check=True).out)["backups"]
        assert {b["backup_id"]: b["signature"] for b in listing} == {
            foreign: "BAD", moved: "BAD", unsigned: "unsigned", real: "signed-by backupd@host-a"}
        for forged, why in ((unsigned, "manifest.json.sig: missing"), (moved, "does not match the data"),
                            (foreign, f"signed by ssh-ed25519 {HOST_B.public.fingerprint}, which is not a trusted")):
            result = run_backupd("restore", "shop", "--to", target.url(), "--backup", forged, config=job.config,
                                 timeout=300)
            assert result.code == 1, result.err
            line = next(line for line in error_lines(result.err) if line.startswith("backupd: error"))
            assert forged in line and f"shop/backups/{forged}/manifest.json.sig" in line and why in line, line
            assert target.sql("SHOW DATABASES LIKE 'sig2'") == target.sql("SHOW DATABASES LIKE 'pwned'") == []
            for args in ([], ["--integrity-only"]):
                verify = run_backupd("verify", "shop", "--backup", forged, "--json", *args, config=job.config)
                assert verify.code == 3, (args, verify.err)
                [report] = json.loads(verify.out)["reports"]
                assert report["backup_id"] == forged and any(why in p for p in report["problems"]), report

        mysql_restore(job, target)  # the newest trusted backup: the real one
        assert target.sql("SELECT id FROM sig2.t ORDER BY id") == [(1,), (2,), (3,)]
        assert target.sql("SHOW DATABASES LIKE 'pwned'") == []

        # The forgery is a working backup: only its missing signature kept it out.
        allowed = run_backupd("restore", "shop", "--to", target.url(), "--backup", unsigned, "--allow-unsigned", "--clean",
                              config=job.config, timeout=300)
        assert allowed.code == 0 and "UNSIGNED backup" in allowed.err, allowed.err
        assert target.sql("SHOW DATABASES LIKE 'pwned'") == [("pwned",)]
    finally:
        source.destroy()
        target.destroy()


def test_the_integrity_rotation_counts_untrusted_backups(signed: Signed) -> None:
    from backupd.daemon.runs import Runs, Slots
    from backupd.daemon.state import ScheduleState
    from backupd.daemon.tasks import Tasks
    from backupd.errors import BackupdError

    real = backup(signed)
    forged, _ = forge(signed, after=real)
    settings = load_settings(signed.config)
    state = ScheduleState(signed.tmp / "state")
    tasks = Tasks(lambda: settings, Runs(), Slots(1), state)
    with pytest.raises(BackupdError, match=forged):
        tasks.integrity("shop")
    assert metrics.REPOSITORY_UNTRUSTED.labels("shop")._value.get() == 1  # noqa: SLF001
    assert sorted(state.integrity_reads("shop")) == [real]  # the real backup is read; the forgery never
    signed.storage.delete(f"shop/backups/{forged}/manifest.json")  # removed by hand once found out
    tasks.integrity("shop")
    assert metrics.REPOSITORY_UNTRUSTED.labels("shop")._value.get() == 0  # noqa: SLF001


def test_the_integrity_rotation_counts_untrusted_logs(signed: Signed) -> None:
    from backupd.daemon.runs import Runs, Slots
    from backupd.daemon.state import ScheduleState
    from backupd.daemon.tasks import Tasks

    backup(signed)
    planted = "shop/binlog/mysql-bin.000001.zst.age"
    signed.storage.put(planted, io.BytesIO(b"not a log of ours"))  # unsigned: no signature beside it
    settings = load_settings(signed.config)
    tasks = Tasks(lambda: settings, Runs(), Slots(1), ScheduleState(signed.tmp / "state"))
    tasks.integrity("shop")
    assert metrics.REPOSITORY_UNTRUSTED.labels("shop")._value.get() == 1  # noqa: SLF001
    signed.storage.delete(planted)
    tasks.integrity("shop")
    assert metrics.REPOSITORY_UNTRUSTED.labels("shop")._value.get() == 0  # noqa: SLF001
