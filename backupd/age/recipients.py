"""The native age recipient types: X25519 keys and scrypt passphrases.

A recipient wraps a file key into header stanzas; an identity unwraps it,
returning None for stanzas not addressed to it and raising HeaderError for
stanzas of its type that are malformed."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from backupd.age import bech32
from backupd.age.errors import AgeError, HeaderError
from backupd.age.header import Stanza, b64decode, b64encode, hkdf

FILE_KEY_SIZE = 16
RECIPIENT_HRP = "age"
IDENTITY_HRP = "AGE-SECRET-KEY-"
X25519_LABEL = b"age-encryption.org/v1/X25519"
SCRYPT_LABEL = b"age-encryption.org/v1/scrypt"
_ZERO_NONCE = bytes(12)
_WORK_FACTOR = re.compile(r"[1-9][0-9]*")
_MAX_WORK_FACTOR = 30


class Recipient(Protocol):
    def wrap(self, file_key: bytes) -> list[Stanza]: ...


class Identity(Protocol):
    def unwrap(self, stanzas: Sequence[Stanza]) -> bytes | None: ...


def _seal(key: bytes, file_key: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, file_key, None)


def _open(key: bytes, body: bytes) -> bytes | None:
    try:
        return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, body, None)
    except InvalidTag:
        return None


class X25519Recipient:
    __slots__ = ("_public",)

    def __init__(self, public_key: bytes) -> None:
        if len(public_key) != 32:
            raise AgeError("an X25519 public key is 32 bytes")
        self._public = bytes(public_key)

    @classmethod
    def parse(cls, s: str) -> X25519Recipient:
        s = s.strip()
        if s.upper().startswith(IDENTITY_HRP):
            raise AgeError("expected an age recipient (age1...), got a secret key")
        try:
            hrp, data = bech32.decode(s)
        except ValueError as exc:
            raise AgeError(f"malformed age recipient {s!r}: {exc}") from exc
        if hrp != RECIPIENT_HRP:
            raise AgeError(f"malformed age recipient {s!r}: expected prefix 'age1' (lowercase)")
        if len(data) != 32:
            raise AgeError(f"malformed age recipient {s!r}: wrong key length {len(data)}")
        return cls(data)

    def wrap(self, file_key: bytes) -> list[Stanza]:
        ephemeral = X25519PrivateKey.generate()
        share = ephemeral.public_key().public_bytes_raw()
        try:
            secret = ephemeral.exchange(X25519PublicKey.from_public_bytes(self._public))
        except ValueError as exc:
            raise AgeError(f"recipient {self} is a low-order point") from exc
        wrap_key = hkdf(secret, share + self._public, X25519_LABEL)
        return [Stanza("X25519", (b64encode(share),), _seal(wrap_key, file_key))]

    def __str__(self) -> str:
        return bech32.encode(RECIPIENT_HRP, self._public)

    def __repr__(self) -> str:
        return f"X25519Recipient({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, X25519Recipient) and other._public == self._public

    def __hash__(self) -> int:
        return hash(self._public)


class X25519Identity:
    __slots__ = ("_key", "_public", "_secret")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise AgeError("an X25519 secret key is 32 bytes")
        self._secret = bytes(secret)
        self._key = X25519PrivateKey.from_private_bytes(self._secret)
        self._public = self._key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> X25519Identity:
        return cls(os.urandom(32))

    @classmethod
    def parse(cls, s: str) -> X25519Identity:
        # Error messages never repeat the input: it may be a secret.
        s = s.strip()
        try:
            hrp, data = bech32.decode(s)
        except ValueError as exc:
            raise AgeError(f"malformed age secret key: {exc}") from exc
        if hrp != IDENTITY_HRP:
            if hrp.upper() == IDENTITY_HRP:
                raise AgeError("malformed age secret key: must be uppercase")
            raise AgeError(
                f"not an age X25519 secret key (prefix {hrp + '1'!r}, expected 'AGE-SECRET-KEY-1')"
            )
        if len(data) != 32:
            raise AgeError(f"malformed age secret key: wrong key length {len(data)}")
        return cls(data)

    def to_recipient(self) -> X25519Recipient:
        return X25519Recipient(self._public)

    def unwrap(self, stanzas: Sequence[Stanza]) -> bytes | None:
        for stanza in stanzas:
            if stanza.type != "X25519":
                continue
            if len(stanza.args) != 1:
                raise HeaderError("X25519 stanza must have exactly one argument")
            try:
                share = b64decode(stanza.args[0])
            except ValueError as exc:
                raise HeaderError(f"malformed X25519 ephemeral share: {exc}") from exc
            if len(share) != 32:
                raise HeaderError("malformed X25519 ephemeral share: wrong length")
            if len(stanza.body) != FILE_KEY_SIZE + 16:
                raise HeaderError("X25519 stanza body has the wrong length")
            try:
                secret = self._key.exchange(X25519PublicKey.from_public_bytes(share))
            except ValueError as exc:
                raise HeaderError("X25519 ephemeral share is a low-order point") from exc
            if secret == bytes(32):
                raise HeaderError("X25519 ephemeral share is a low-order point")
            file_key = _open(hkdf(secret, share + self._public, X25519_LABEL), stanza.body)
            if file_key is not None:
                return file_key
        return None

    def __str__(self) -> str:
        return bech32.encode(IDENTITY_HRP, self._secret).upper()

    def __repr__(self) -> str:
        return f"X25519Identity(<secret for {self.to_recipient()}>)"


def _passphrase(passphrase: str | bytes) -> bytes:
    raw = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    if not raw:
        raise AgeError("empty passphrase")
    return raw


def _check_work_factor(work_factor: int) -> int:
    if not 1 <= work_factor <= _MAX_WORK_FACTOR:
        raise AgeError(f"scrypt work factor must be between 1 and {_MAX_WORK_FACTOR}")
    return work_factor


def _scrypt(passphrase: bytes, salt: bytes, work_factor: int) -> bytes:
    kdf = Scrypt(salt=SCRYPT_LABEL + salt, length=32, n=1 << work_factor, r=8, p=1)
    return kdf.derive(passphrase)


class ScryptRecipient:
    """A passphrase; a file encrypted to it can have no other recipient."""

    __slots__ = ("_passphrase", "_work_factor")

    def __init__(self, passphrase: str | bytes, work_factor: int = 18) -> None:
        self._passphrase = _passphrase(passphrase)
        self._work_factor = _check_work_factor(work_factor)

    def wrap(self, file_key: bytes) -> list[Stanza]:
        salt = os.urandom(16)
        wrap_key = _scrypt(self._passphrase, salt, self._work_factor)
        args = (b64encode(salt), str(self._work_factor))
        return [Stanza("scrypt", args, _seal(wrap_key, file_key))]

    def __repr__(self) -> str:
        return f"ScryptRecipient(<passphrase>, work_factor={self._work_factor})"


class ScryptIdentity:
    __slots__ = ("_max_work_factor", "_passphrase")

    def __init__(self, passphrase: str | bytes, max_work_factor: int = 22) -> None:
        self._passphrase = _passphrase(passphrase)
        self._max_work_factor = _check_work_factor(max_work_factor)

    def unwrap(self, stanzas: Sequence[Stanza]) -> bytes | None:
        for stanza in stanzas:
            if stanza.type != "scrypt":
                continue
            if len(stanza.args) != 2:
                raise HeaderError("scrypt stanza must have exactly two arguments")
            try:
                salt = b64decode(stanza.args[0])
            except ValueError as exc:
                raise HeaderError(f"malformed scrypt salt: {exc}") from exc
            if len(salt) != 16:
                raise HeaderError("malformed scrypt salt: wrong length")
            if not _WORK_FACTOR.fullmatch(stanza.args[1]):
                raise HeaderError(f"malformed scrypt work factor {stanza.args[1][:20]!r}")
            arg = stanza.args[1]
            if len(arg) > 2 or int(arg) > self._max_work_factor:
                raise HeaderError(
                    f"scrypt work factor {arg[:20]} exceeds the maximum {self._max_work_factor}"
                )
            work_factor = int(arg)
            if len(stanza.body) != FILE_KEY_SIZE + 16:
                raise HeaderError("scrypt stanza body has the wrong length")
            file_key = _open(_scrypt(self._passphrase, salt, work_factor), stanza.body)
            if file_key is not None:
                return file_key
        return None

    def __repr__(self) -> str:
        return f"ScryptIdentity(<passphrase>, max_work_factor={self._max_work_factor})"


def parse_recipient(s: str) -> X25519Recipient:
    return X25519Recipient.parse(s)


def parse_identities(text: str) -> list[X25519Identity]:
    """age identity file format: one secret key per line, '#' comments, blank lines."""
    identities = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            identities.append(X25519Identity.parse(line))
        except AgeError as exc:
            raise AgeError(f"line {number}: {exc}") from exc
    if not identities:
        raise AgeError("no secret keys found")
    return identities


def load_identities(path: str | os.PathLike[str]) -> list[X25519Identity]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AgeError(f"cannot read identity file {str(path)!r}: {exc}") from exc
    try:
        return parse_identities(text)
    except AgeError as exc:
        raise AgeError(f"identity file {str(path)!r}: {exc}") from exc
