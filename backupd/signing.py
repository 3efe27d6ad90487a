"""Signed manifests: ``manifest.json.sig`` beside each ``manifest.json`` (DESIGN.md "Signing").

The signature is an SSH signature (backupd.sshsig, namespace ``backupd``) over the manifest's
exact bytes; the manifest lists every stream's sha256, so the streams are covered too. It is
put before the manifest, which stays the commit point: a committed backup written by a
signing host always has its signature. Anyone can check one by hand::

    ssh-keygen -Y verify -n backupd -f allowed_signers -I backupd -s manifest.json.sig < manifest.json

Callers check only when trusted keys are configured (``Settings.trusted_keys(job)``); an
empty list trusts nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
from dataclasses import dataclass
from typing import Literal, Sequence

from backupd import sshsig
from backupd.errors import ObjectExists, ObjectNotFound
from backupd.sshsig import PublicKey, SignatureError, SigningKey
from backupd.storage import Storage

class Unsigned(SignatureError):
    """The object has no signature beside it."""


def signature_key(key: str) -> str:
    """Where the signature of the object stored at ``key`` lives (``Layout.signature_beside``: ``<key>.sig``)."""
    from backupd.repository import Layout  # the repository imports this module: the layout is read at call time

    return Layout.signature_beside(key)


def sign_manifest(storage: Storage, manifest_key: str, manifest: bytes, key: SigningKey, *,
                  retain_until: dt.datetime | None = None) -> str:
    """Sign ``manifest`` (the bytes about to be put at ``manifest_key``) and put the signature beside it.

    Call it before putting the manifest. Returns the signature's key."""
    sig_key = signature_key(manifest_key)
    storage.put(sig_key, io.BytesIO(sshsig.sign(manifest, key).encode()), retain_until=retain_until)
    return sig_key


def check_manifest(storage: Storage, manifest_key: str, manifest: bytes, trusted: Sequence[PublicKey]) -> PublicKey:
    """The trusted key that signed ``manifest`` (the bytes read from ``manifest_key``).

    Raises Unsigned (no signature object), or BadArmor, WrongNamespace, UnknownKey, BadSignature,
    each naming the signature's key; storage errors pass through."""
    sig_key = signature_key(manifest_key)
    try:
        with contextlib.closing(storage.open(sig_key)) as handle:
            armored = handle.read(sshsig.MAX_ARMOR + 1)  # bounded: a larger one is refused as BadArmor
    except ObjectNotFound:
        raise Unsigned(f"{sig_key}: missing; the manifest is not signed") from None
    return sshsig.verify(manifest, armored, trusted, what=sig_key)


def log_message(kind: str, name: str, sha256: str) -> bytes:
    """What a log object's signature covers: its kind, its name in the archive and its plaintext's sha256
    (hex). Not its storage key: an object keeps its signature when it moves to another layout.

    Checked by hand with ``printf 'backupd-log-v2\\n%s\\n%s\\n%s\\n' KIND NAME SHA256 | ssh-keygen -Y verify ...``."""
    return f"backupd-log-v2\n{kind}\n{name}\n{sha256}\n".encode()


def legacy_log_message(key: str, sha256: str) -> bytes:
    """What signatures made before ``log_message`` covered: the object's storage key then, and its sha256."""
    return b"backupd-log-v1\n" + key.encode() + b"\n" + sha256.encode() + b"\n"


def sign_log(storage: Storage, key: str, kind: str, name: str, sha256: str, signer: SigningKey, *, replace: bool,
             retain_until: dt.datetime | None = None) -> str:
    """Put the signature of the log ``kind``/``name`` (plaintext ``sha256``) about to be put at ``key`` beside it.

    Call it before putting the object. Without ``replace`` an existing signature is kept while
    its object exists (the object's own put then reports "identical" or a conflict); one left
    by a push that died before its object is overwritten. Returns the signature's key."""
    sig_key = signature_key(key)
    body = sshsig.sign(log_message(kind, name, sha256), signer).encode()
    try:
        storage.put(sig_key, io.BytesIO(body), if_absent=not replace, retain_until=retain_until)
    except ObjectExists:
        try:
            storage.stat(key)
        except ObjectNotFound:
            storage.put(sig_key, io.BytesIO(body), retain_until=retain_until)
    return sig_key


def check_log(storage: Storage, key: str, kind: str, name: str, sha256: str | None, trusted: Sequence[PublicKey],
              legacy_keys: Sequence[str] = ()) -> PublicKey:
    """The trusted key that signed the log ``kind``/``name`` stored at ``key`` whose plaintext sha256 is
    recorded as ``sha256``. A signature made before signatures named the log (``legacy_log_message``)
    is accepted over ``key`` or any of ``legacy_keys`` (where the object lay when it was signed).

    Raises Unsigned or another SignatureError naming the signature's key."""
    sig_key = signature_key(key)
    try:
        with contextlib.closing(storage.open(sig_key)) as handle:
            armored = handle.read(sshsig.MAX_ARMOR + 1)
    except ObjectNotFound:
        raise Unsigned(f"{sig_key}: missing; the log object is not signed") from None
    if not sha256:
        raise sshsig.BadSignature(f"{key}: no sha256 recorded with the object; its signature cannot be checked")
    try:
        return sshsig.verify(log_message(kind, name, sha256), armored, trusted, what=sig_key)
    except sshsig.BadSignature as exc:
        for old_key in (key, *legacy_keys):
            try:
                return sshsig.verify(legacy_log_message(old_key, sha256), armored, trusted, what=sig_key)
            except sshsig.BadSignature:
                continue
        raise exc from None


@dataclass(frozen=True)
class Trust:
    """What ``list``, ``show`` and ``prune`` say of a manifest: signed by a trusted key, unsigned, or bad."""

    status: Literal["signed", "unsigned", "bad"]
    signer: PublicKey | None = None
    problem: str = ""

    def __str__(self) -> str:
        if self.status == "signed":
            assert self.signer is not None
            return f"signed-by {self.signer.comment or self.signer.fingerprint}"
        return "unsigned" if self.status == "unsigned" else "BAD"


def assess_manifest(storage: Storage, manifest_key: str, manifest: bytes, trusted: Sequence[PublicKey]) -> Trust:
    """check_manifest() as a verdict instead of an exception (storage errors still pass through)."""
    try:
        return Trust("signed", check_manifest(storage, manifest_key, manifest, trusted))
    except Unsigned as exc:
        return Trust("unsigned", problem=str(exc))
    except SignatureError as exc:
        return Trust("bad", problem=str(exc))
