"""age v1 file encryption (https://age-encryption.org/v1) on top of `cryptography`.

X25519 and scrypt recipients, incremental Encryptor/Decryptor for streaming
pipelines, and strict ASCII armor."""

from backupd.age.armor import armor, dearmor, is_armored
from backupd.age.decryptor import Decryptor, decrypt
from backupd.age.encryptor import Encryptor, encrypt
from backupd.age.errors import AgeError, ArmorError, HeaderError, HmacError, NoIdentityMatch, PayloadError
from backupd.age.header import Stanza
from backupd.age.recipients import (
    Identity,
    Recipient,
    ScryptIdentity,
    ScryptRecipient,
    X25519Identity,
    X25519Recipient,
    load_identities,
    parse_identities,
    parse_recipient,
)

__all__ = [
    "AgeError",
    "ArmorError",
    "Decryptor",
    "Encryptor",
    "HeaderError",
    "HmacError",
    "Identity",
    "NoIdentityMatch",
    "PayloadError",
    "Recipient",
    "ScryptIdentity",
    "ScryptRecipient",
    "Stanza",
    "X25519Identity",
    "X25519Recipient",
    "armor",
    "dearmor",
    "decrypt",
    "encrypt",
    "is_armored",
    "load_identities",
    "parse_identities",
    "parse_recipient",
]
