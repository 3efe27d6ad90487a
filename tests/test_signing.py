"""Signed manifests (backupd.signing) on the filesystem and S3 backends: a signature beside each
manifest that ssh-keygen accepts, and refusals for a missing, forged, moved, foreign or oversized one."""

from __future__ import annotations

import datetime as dt
import io
import re
import subprocess
from pathlib import Path

import pytest

from backupd import signing, sshsig
from backupd.manifest import Manifest, ObjectEntry
from backupd.signing import Trust, Unsigned
from backupd.sshsig import BadArmor, BadSignature, SigningKey, UnknownKey
from backupd.storage import Storage

from signing_support import read
from support import require_tool

HOST_A = SigningKey.generate("backupd@host-a")
HOST_B = SigningKey.generate("backupd@host-b")


def manifest_bytes(backup_id: str, sha256: str = "ab" * 32) -> bytes:
    start = dt.datetime(2026, 12, 5, 9, 30, tzinfo=dt.timezone.utc)
    return Manifest(backup_id=backup_id, job="orders", driver="postgresql", method="logical", started_at=start,
                    finished_at=start + dt.timedelta(minutes=2),
                    objects=[ObjectEntry("db", "db.zst.age", 1000, 700, sha256)],
                    compression={"algorithm": "zstd", "level": 3}, encryption={"recipients": ["age1..."]}).to_json()


def key_of(backup_id: str) -> str:
    return f"orders/backups/{backup_id}/manifest.json"


def put(storage: Storage, key: str, data: bytes) -> None:
    storage.put(key, io.BytesIO(data))


def test_a_signed_manifest_checks_here_and_with_ssh_keygen(storage: Storage, tmp_path: Path) -> None:
    data = manifest_bytes("20261205T093000Z")
    key = key_of("20261205T093000Z")
    assert signing.sign_manifest(storage, key, data, HOST_A) == key + ".sig"
    put(storage, key, data)

    assert signing.check_manifest(storage, key, read(storage, key), [HOST_B.public, HOST_A.public]) == HOST_A.public
    trust = signing.assess_manifest(storage, key, data, [HOST_A.public])
    assert trust == Trust("signed", HOST_A.public) and str(trust) == "signed-by backupd@host-a"

    # By hand, as the README says.
    (tmp_path / "manifest.json").write_bytes(read(storage, key))
    (tmp_path / "manifest.json.sig").write_bytes(read(storage, key + ".sig"))
    (tmp_path / "allowed_signers").write_text(f"backupd {HOST_A.public.line()}\n")
    with open(tmp_path / "manifest.json", "rb") as stdin:
        proc = subprocess.run([require_tool("ssh-keygen"), "-Y", "verify", "-n", "backupd", "-f",
                               str(tmp_path / "allowed_signers"), "-I", "backupd", "-s",
                               str(tmp_path / "manifest.json.sig")], stdin=stdin, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_an_unsigned_manifest_is_refused(storage: Storage) -> None:
    data = manifest_bytes("20261205T093000Z")
    key = key_of("20261205T093000Z")
    put(storage, key, data)
    with pytest.raises(Unsigned, match=r"orders/backups/20261205T093000Z/manifest.json.sig: missing; the manifest "
                                       r"is not signed"):
        signing.check_manifest(storage, key, data, [HOST_A.public])
    trust = signing.assess_manifest(storage, key, data, [HOST_A.public])
    assert trust.status == "unsigned" and str(trust) == "unsigned" and "missing" in trust.problem


def test_a_forged_manifest_is_refused(storage: Storage) -> None:
    """An attacker who can write the bucket rewrites a signed manifest to point at streams of their own."""
    key = key_of("20261205T093000Z")
    signing.sign_manifest(storage, key, manifest_bytes("20261205T093000Z"), HOST_A)
    forged = manifest_bytes("20261205T093000Z", sha256="cd" * 32)
    put(storage, key, forged)
    with pytest.raises(BadSignature, match="manifest.json.sig: the signature does not match the data"):
        signing.check_manifest(storage, key, forged, [HOST_A.public])
    trust = signing.assess_manifest(storage, key, forged, [HOST_A.public])
    assert trust.status == "bad" and str(trust) == "BAD" and "does not match" in trust.problem


def test_a_signature_moved_from_another_manifest_is_refused(storage: Storage) -> None:
    old, new = "20261204T093000Z", "20261205T093000Z"
    signing.sign_manifest(storage, key_of(old), manifest_bytes(old), HOST_A)
    put(storage, key_of(new) + ".sig", read(storage, key_of(old) + ".sig"))
    with pytest.raises(BadSignature):
        signing.check_manifest(storage, key_of(new), manifest_bytes(new), [HOST_A.public])


def test_another_hosts_key_does_not_vouch_for_this_job(storage: Storage) -> None:
    key = key_of("20261205T093000Z")
    data = manifest_bytes("20261205T093000Z")
    signing.sign_manifest(storage, key, data, HOST_B)
    with pytest.raises(UnknownKey, match=re.escape(f"signed by ssh-ed25519 {HOST_B.public.fingerprint}, which "
                                                   "is not a trusted key")):
        signing.check_manifest(storage, key, data, [HOST_A.public])  # jobs.orders.trusted_keys = [host A]


def test_an_oversized_signature_is_refused(storage: Storage) -> None:
    key = key_of("20261205T093000Z")
    data = manifest_bytes("20261205T093000Z")
    put(storage, key + ".sig", b"-----BEGIN SSH SIGNATURE-----\n" + b"A" * (8 << 20))
    with pytest.raises(BadArmor, match="larger than"):
        signing.check_manifest(storage, key, data, [HOST_A.public])
    assert sshsig.MAX_ARMOR < 8 << 20
