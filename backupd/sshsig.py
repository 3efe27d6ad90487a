"""SSH signatures (OpenSSH's SSHSIG format, ``ssh-keygen -Y sign/verify``) with Ed25519 keys.

A signature is an armored blob::

    -----BEGIN SSH SIGNATURE-----
    base64 of: "SSHSIG" uint32(1) string(publickey) string(namespace) string(reserved)
               string(hash_algorithm) string(signature)
    -----END SSH SIGNATURE-----

where the signature is made over ``"SSHSIG" string(namespace) string(reserved)
string(hash_algorithm) string(H(message))`` (OpenSSH's PROTOCOL.sshsig). backupd signs with
sha512, as ssh-keygen does, and accepts sha256 and sha512. Keys are OpenSSH's own files:
the private key as ``-----BEGIN OPENSSH PRIVATE KEY-----`` (unencrypted), public keys as
``ssh-ed25519 AAAA... comment`` lines.

Signatures come from storage, which an attacker may write: parsing is bounded (size of the
armor, every length field against what is left) and every failure is a SignatureError
subclass naming what failed: BadArmor, WrongNamespace, UnknownKey or BadSignature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from backupd.errors import BackupdError, ConfigError, read_secret

NAMESPACE = "backupd"
MAGIC = b"SSHSIG"
VERSION = 1
BEGIN = "-----BEGIN SSH SIGNATURE-----"
END = "-----END SSH SIGNATURE-----"
COLUMNS = 70  # as ssh-keygen writes it
KEY_TYPE = "ssh-ed25519"
HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
SIGN_HASH = "sha512"
#: An Ed25519 signature is about 300 characters armored; anything much larger is not one of ours.
MAX_ARMOR = 8192
MAX_KEY_LINE = 4096
CHUNK = 1 << 20


class SignatureError(BackupdError):
    """A signature does not vouch for the data; the subclass says why."""


class BadArmor(SignatureError):
    """Not an SSH signature: armor, base64 or the blob's layout is wrong, or an unsupported version."""


class WrongNamespace(SignatureError):
    """A valid signature made for another purpose (namespace) than the one checked."""


class UnknownKey(SignatureError):
    """Signed by a key that is not among the trusted ones."""


class BadSignature(SignatureError):
    """Signed by a trusted key, but the signature does not match the data (forged or altered)."""


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key; equal keys compare equal whatever their comments."""

    raw: bytes
    comment: str = field(default="", compare=False)

    @property
    def blob(self) -> bytes:
        """The key in SSH wire encoding (RFC 8709): string("ssh-ed25519") string(32 bytes)."""
        return _string(KEY_TYPE.encode()) + _string(self.raw)

    @property
    def fingerprint(self) -> str:
        """As ``ssh-keygen -l`` prints it: ``SHA256:`` and unpadded base64."""
        return "SHA256:" + base64.b64encode(hashlib.sha256(self.blob).digest()).decode().rstrip("=")

    def line(self) -> str:
        """``ssh-ed25519 AAAA... comment``, the authorized_keys / trusted_keys form."""
        text = f"{KEY_TYPE} {base64.b64encode(self.blob).decode()}"
        return f"{text} {self.comment}" if self.comment else text

    def __str__(self) -> str:
        return f"{KEY_TYPE} {self.fingerprint}" + (f" ({self.comment})" if self.comment else "")

    def _crypto(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.raw)


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key and the comment its public line carries."""

    private: Ed25519PrivateKey
    comment: str = ""

    @classmethod
    def generate(cls, comment: str = "") -> SigningKey:
        return cls(Ed25519PrivateKey.generate(), comment)

    @property
    def public(self) -> PublicKey:
        raw = self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return PublicKey(raw, self.comment)

    def to_openssh(self) -> str:
        """The private key as an unencrypted ``-----BEGIN OPENSSH PRIVATE KEY-----`` file."""
        return self.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()).decode()


def parse_public_key(line: str) -> PublicKey:
    """``ssh-ed25519 AAAA... [comment]`` as a PublicKey; ValueError saying what is wrong."""
    if len(line) > MAX_KEY_LINE:
        raise ValueError("not an OpenSSH public key line (too long)")
    parts = line.strip().split(None, 2)
    if len(parts) < 2:
        raise ValueError("not an OpenSSH public key line: expected 'ssh-ed25519 AAAA... comment'")
    if parts[0] != KEY_TYPE:
        raise ValueError(f"only {KEY_TYPE} keys are supported, not {parts[0][:40]}")
    try:
        key = serialization.load_ssh_public_key(f"{parts[0]} {parts[1]}".encode())
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a valid ssh-ed25519 public key (the base64 part is damaged)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"only {KEY_TYPE} keys are supported")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey(raw, parts[2].strip() if len(parts) > 2 else "")


def load_private_key(path: Path, what: str = "signing key") -> SigningKey:
    """An unencrypted OpenSSH Ed25519 private key file; ConfigError naming the file otherwise."""
    data = read_secret(path, what)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{what} {path}: the key is encrypted with a passphrase; backupd needs an "
                          "unencrypted key (keep it 0600)",
                          hint="create one with `backupd keys generate --signing -o FILE`") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{what} {path}: not an OpenSSH private key (-----BEGIN OPENSSH PRIVATE KEY-----)",
                          hint="create one with `backupd keys generate --signing -o FILE`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{what} {path}: only Ed25519 keys are supported (got {type(key).__name__})")
    return SigningKey(key)


# --- signing -------------------------------------------------------------------------------------


def sha512(data: bytes | BinaryIO) -> bytes:
    """The sha512 of bytes or of a stream read to its end (in chunks)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return hashlib.sha512(data).digest()
    hasher = hashlib.sha512()
    while chunk := data.read(CHUNK):
        hasher.update(chunk)
    return hasher.digest()


def sign(data: bytes | BinaryIO, key: SigningKey, namespace: str = NAMESPACE) -> str:
    """An armored SSH signature of ``data`` (bytes, or a stream read to its end)."""
    return sign_digest(sha512(data), key, namespace)


def sign_digest(digest: bytes, key: SigningKey, namespace: str = NAMESPACE) -> str:
    """An armored SSH signature of the message whose sha512 is ``digest`` (hashed while streaming)."""
    if not namespace:
        raise ValueError("the namespace must not be empty")
    if len(digest) != hashlib.sha512().digest_size:
        raise ValueError("expected a sha512 digest")
    signed = _signed_data(namespace.encode(), b"", SIGN_HASH.encode(), digest)
    signature = _string(KEY_TYPE.encode()) + _string(key.private.sign(signed))
    blob = (MAGIC + struct.pack(">I", VERSION) + _string(key.public.blob) + _string(namespace.encode())
            + _string(b"") + _string(SIGN_HASH.encode()) + _string(signature))
    encoded = base64.b64encode(blob).decode()
    lines = [encoded[i:i + COLUMNS] for i in range(0, len(encoded), COLUMNS)]
    return "\n".join([BEGIN, *lines, END]) + "\n"


# --- verifying -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    """The fields of a signature blob, before anything is trusted."""

    key_blob: bytes
    namespace: bytes
    reserved: bytes
    hash_algorithm: bytes
    signature: bytes


def parse(armored: str | bytes, what: str = "signature") -> Parsed:
    """The blob inside an armored signature; BadArmor naming what is malformed."""
    if isinstance(armored, str):
        try:
            armored = armored.encode("ascii")
        except UnicodeEncodeError:
            raise BadArmor(f"{what}: not an SSH signature (non-ASCII text)") from None
    if len(armored) > MAX_ARMOR:
        raise BadArmor(f"{what}: not an SSH signature (larger than {MAX_ARMOR} bytes)")
    lines = [line.strip() for line in bytes(armored).strip().splitlines()]
    if not lines or lines[0] != BEGIN.encode():
        raise BadArmor(f"{what}: not an SSH signature (no {BEGIN} line)")
    if len(lines) < 3 or lines[-1] != END.encode():
        raise BadArmor(f"{what}: not an SSH signature (no {END} line: truncated?)")
    try:
        blob = base64.b64decode(b"".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise BadArmor(f"{what}: the signature's base64 is damaged") from None
    reader = _Reader(blob, what)
    if reader.take(len(MAGIC)) != MAGIC:
        raise BadArmor(f"{what}: not an SSH signature (no SSHSIG preamble)")
    version = reader.uint32()
    if version != VERSION:
        raise BadArmor(f"{what}: unsupported SSH signature version {version} (backupd reads version {VERSION})")
    parsed = Parsed(reader.string(), reader.string(), reader.string(), reader.string(), reader.string())
    reader.end()
    return parsed


def verify(data: bytes | BinaryIO, armored: str | bytes, trusted: Iterable[PublicKey],
           namespace: str = NAMESPACE, what: str = "signature") -> PublicKey:
    """The trusted key that signed ``data`` (bytes, or a stream read to its end).

    Raises BadArmor, WrongNamespace, UnknownKey or BadSignature, each naming ``what``. The
    namespace and the key are checked before ``data`` is read.
    """
    parsed = parse(armored, what)
    hash_name = parsed.hash_algorithm.decode("ascii", "replace")
    if hash_name not in HASHES:
        raise BadArmor(f"{what}: unsupported hash algorithm {hash_name[:32]!r} (expected sha256 or sha512)")
    signer = _trusted_signer(parsed, trusted, namespace, what)
    if isinstance(data, (bytes, bytearray, memoryview)):
        digest = HASHES[hash_name](data).digest()
    else:
        hasher = HASHES[hash_name]()
        while chunk := data.read(CHUNK):
            hasher.update(chunk)
        digest = hasher.digest()
    _check_signature(parsed, digest, signer, what)
    return signer


def signer_of(data: bytes, armored: str | bytes, namespace: str = NAMESPACE, what: str = "signature") -> PublicKey:
    """The key that made this signature over ``data``, checked against the key the signature names.

    Proves only that whoever holds that key signed: the caller decides whether it trusts it."""
    parsed = parse(armored, what)
    signer = _key_from_blob(parsed.key_blob, what)
    if isinstance(signer, str):
        raise UnknownKey(f"{what}: signed by {signer}, which backupd cannot check")
    return verify(data, armored, [signer], namespace, what)


def verify_digest(digest: bytes, armored: str | bytes, trusted: Iterable[PublicKey],
                  namespace: str = NAMESPACE, what: str = "signature") -> PublicKey:
    """As verify() for a message whose sha512 is ``digest``; a signature made with sha256 is a BadArmor."""
    parsed = parse(armored, what)
    if parsed.hash_algorithm != SIGN_HASH.encode():
        shown = parsed.hash_algorithm[:32].decode("ascii", "replace")
        raise BadArmor(f"{what}: made with hash {shown!r}, expected sha512")
    signer = _trusted_signer(parsed, trusted, namespace, what)
    _check_signature(parsed, digest, signer, what)
    return signer


def _trusted_signer(parsed: Parsed, trusted: Iterable[PublicKey], namespace: str, what: str) -> PublicKey:
    """The trusted key (with its configured comment) the signature names; WrongNamespace, UnknownKey."""
    if parsed.namespace != namespace.encode():
        shown = parsed.namespace[:64].decode("ascii", "replace")
        raise WrongNamespace(f"{what}: signed for namespace {shown!r}, not {namespace!r}")
    signer = _key_from_blob(parsed.key_blob, what)
    trusted_keys = list(trusted)
    if isinstance(signer, str) or signer not in trusted_keys:
        shown = signer if isinstance(signer, str) else f"{KEY_TYPE} {signer.fingerprint}"
        raise UnknownKey(f"{what}: signed by {shown}, which is not a trusted key ({len(trusted_keys)} trusted)")
    return trusted_keys[trusted_keys.index(signer)]


def _check_signature(parsed: Parsed, digest: bytes, signer: PublicKey, what: str) -> None:
    reader = _Reader(parsed.signature, what)
    algorithm, signature = reader.string(), reader.string()
    reader.end()
    if algorithm != KEY_TYPE.encode() or len(signature) != 64:
        raise BadSignature(f"{what}: not an {KEY_TYPE} signature; it does not match {signer}")
    signed = _signed_data(parsed.namespace, parsed.reserved, parsed.hash_algorithm, digest)
    try:
        signer._crypto().verify(signature, signed)
    except InvalidSignature:
        raise BadSignature(f"{what}: the signature does not match the data (forged or altered); "
                           f"it claims {signer}") from None


def _key_from_blob(blob: bytes, what: str) -> PublicKey | str:
    """The Ed25519 key in a signature; for another key type, a description of it (never trusted)."""
    reader = _Reader(blob, what)
    kind = reader.string()
    if kind != KEY_TYPE.encode():
        return f"a {kind[:32].decode('ascii', 'replace')!r} key"
    raw = reader.string()
    reader.end()
    if len(raw) != 32:
        raise BadArmor(f"{what}: the signature's public key is malformed")
    return PublicKey(raw)


def _signed_data(namespace: bytes, reserved: bytes, hash_algorithm: bytes, digest: bytes) -> bytes:
    return MAGIC + _string(namespace) + _string(reserved) + _string(hash_algorithm) + _string(digest)


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


class _Reader:
    """RFC 4251 fields from a bounded buffer: every length is checked against what is left."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.offset = 0
        self.what = what

    def take(self, count: int) -> bytes:
        if count > len(self.data) - self.offset:
            raise BadArmor(f"{self.what}: the signature is truncated or malformed")
        chunk = self.data[self.offset:self.offset + count]
        self.offset += count
        return chunk

    def uint32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def string(self) -> bytes:
        return self.take(self.uint32())

    def end(self) -> None:
        if self.offset != len(self.data):
            raise BadArmor(f"{self.what}: unexpected bytes after the signature")
