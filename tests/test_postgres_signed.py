"""Signed manifests against a real PostgreSQL physical backup: a copy of a real backup under a new
id (every stream valid, right sha256) without the host's signature, with the real backup's signature
moved beside it, or signed by another host's key, is refused by restore and verify, and never
becomes "the newest backup"."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

from backupd import sshsig
from backupd.manifest import Manifest
from backupd.sshsig import SigningKey
from drivers.postgres.cluster import chown_tree
from pg_fixtures import JOB, PgEnv, pg_env  # noqa: F401 (fixture)
from support import write_config

ARCHIVE_LOGS = True
METHOD = "physical"
HOST = SigningKey.generate("backupd@db1")
OTHER_HOST = SigningKey.generate("backupd@db2")  # another host of the bucket


@pytest.fixture(scope="module")
def signed_backup(pg_env: PgEnv) -> str:  # noqa: F811
    key = pg_env.root / "signing.key"
    key.write_text(HOST.to_openssh())
    key.chmod(0o600)
    signing = write_config(pg_env.root / "signing.toml", {"signing": {
        "key_file": str(key), "trusted_keys": [HOST.public.line()]}}).read_text()
    pg_env.config.write_text(signing + "\n" + pg_env.config.read_text())
    chown_tree(pg_env.root, "postgres")
    pg_env.sql("CREATE TABLE orders (id serial PRIMARY KEY, note text)")
    pg_env.sql("INSERT INTO orders (note) SELECT 'real' FROM generate_series(1, 100)")
    return pg_env.backupd("backup", JOB, check=True).out.strip()


def copy_backup(pg_env: PgEnv, real: str, hours: int) -> Path:  # noqa: F811
    """A copy of backup ``real`` under a later id, every stream valid, without its signature."""
    source = pg_env.repo / JOB / "backups" / real
    moment = dt.datetime.strptime(real[:16], "%Y%m%dT%H%M%SZ") + dt.timedelta(hours=hours)
    target = pg_env.repo / JOB / "backups" / moment.strftime("%Y%m%dT%H%M%SZ")
    shutil.copytree(source, target)
    (target / "manifest.json.sig").unlink()
    document = json.loads((source / "manifest.json").read_text())
    document["backup_id"] = target.name
    (target / "manifest.json").write_bytes(Manifest.from_dict(document).to_json())
    chown_tree(pg_env.root, "postgres")
    return target


def test_a_copied_physical_backup_without_the_signature_is_refused(pg_env: PgEnv, signed_backup: str) -> None:  # noqa: F811
    real = signed_backup
    assert (pg_env.repo / JOB / "backups" / real / "manifest.json.sig").exists()
    forged = copy_backup(pg_env, real, 1).name

    listing = json.loads(pg_env.backupd("list", JOB, "--json", check=True).out)["backups"]
    assert {b["backup_id"]: b["signature"] for b in listing} == {forged: "unsigned", real: "signed-by backupd@db1"}

    refused = pg_env.backupd("restore", JOB, "--to", str(pg_env.root / "forged"), "--backup", forged)
    assert refused.code == 1 and f"backup {forged} of job {JOB} is not trusted" in refused.err, refused.err
    assert not (pg_env.root / "forged").exists()

    plan = pg_env.backupd("restore", JOB, "--to", str(pg_env.root / "newest"), "--dry-run", check=True)
    assert real in plan.out and forged not in plan.out

    verify = pg_env.backupd("verify", JOB, "--backup", forged, "--json")
    assert verify.code == 3, verify.err
    [report] = json.loads(verify.out)["reports"]
    assert report["backup_id"] == forged and "not signed" in report["problems"][0]

    newest = pg_env.backupd("verify", JOB, "--json", as_postgres=False)  # verifies the real one, fails for the forgery
    assert newest.code == 3, newest.err
    [report] = json.loads(newest.out)["reports"]
    assert report["backup_id"] == real and report["restore_seconds"] is not None
    assert [p for p in report["problems"] if forged in p] == report["problems"] != []


@pytest.mark.parametrize("how", ["moved signature", "another host's key"])
def test_a_copied_physical_backup_with_a_wrong_signature_is_refused(pg_env: PgEnv, signed_backup: str,  # noqa: F811
                                                                    how: str) -> None:
    real = signed_backup
    target = copy_backup(pg_env, real, 2 if how == "moved signature" else 3)
    forged = target.name
    if how == "moved signature":  # the real manifest's signature beside the copy's manifest
        shutil.copy(pg_env.repo / JOB / "backups" / real / "manifest.json.sig", target / "manifest.json.sig")
        why = "does not match the data"
    else:  # signed by a host that has a key, but not one this job trusts
        (target / "manifest.json.sig").write_text(sshsig.sign((target / "manifest.json").read_bytes(), OTHER_HOST))
        why = f"signed by ssh-ed25519 {OTHER_HOST.public.fingerprint}, which is not a trusted key"
    chown_tree(pg_env.root, "postgres")
    listing = json.loads(pg_env.backupd("list", JOB, "--json", check=True).out)["backups"]
    assert {b["backup_id"]: b["signature"] for b in listing}[forged] == "BAD"

    refused = pg_env.backupd("restore", JOB, "--to", str(pg_env.root / "forged"), "--backup", forged,
                             "--allow-unsigned")  # not even with --allow-unsigned
    assert refused.code == 1 and f"backup {forged} of job {JOB} is not trusted" in refused.err, refused.err
    assert why in refused.err and f"{JOB}/backups/{forged}/manifest.json.sig" in refused.err, refused.err
    assert not (pg_env.root / "forged").exists()
    for args in ([], ["--integrity-only"]):
        verify = pg_env.backupd("verify", JOB, "--backup", forged, "--json", *args)
        assert verify.code == 3, verify.err
        [report] = json.loads(verify.out)["reports"]
        assert report["backup_id"] == forged and why in report["problems"][0], report
    shutil.rmtree(target)  # the module's other tests see only real backups and the earlier forgeries
