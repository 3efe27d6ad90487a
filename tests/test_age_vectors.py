"""The C2SP CCTV age conformance vectors, run through backupd.age.

Each vector is decrypted twice: in one update(), and in pieces of awkward sizes
that land on every chunk and header boundary sooner or later. Failures must
raise the expected error class, and in every case the plaintext released
before the error must hash to the vector's `payload`."""

from __future__ import annotations

import hashlib
import itertools
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backupd.age import (
    AgeError,
    ArmorError,
    Decryptor,
    HeaderError,
    HmacError,
    NoIdentityMatch,
    PayloadError,
    ScryptIdentity,
    X25519Identity,
    dearmor,
)

#: C2SP CCTV's age vectors, kept in this repository (tests/data/age-cctv, see SOURCE.txt there);
#: BACKUPD_AGE_VECTORS points at another copy (e.g. a newer CCTV checkout).
VECTORS = Path(os.environ.get("BACKUPD_AGE_VECTORS") or Path(__file__).resolve().parent / "data" / "age-cctv")
EXPECTED_ERRORS: dict[str, type[AgeError]] = {
    "no match": NoIdentityMatch,
    "HMAC failure": HmacError,
    "header failure": HeaderError,
    "payload failure": PayloadError,
    "armor failure": ArmorError,
}
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
PIECE_SIZES = (1, 7, 64, 4093, 65552, 1, 65536, 100_003, 2, 65537)


@dataclass
class Vector:
    expect: str
    payload: str | None = None
    identities: list[str] = field(default_factory=list)
    passphrases: list[str] = field(default_factory=list)
    armored: bool = False
    body: bytes = b""


def load(path: Path) -> Vector:
    meta, _, body = path.read_bytes().partition(b"\n\n")
    vector = Vector(expect="")
    compressed = False
    for line in meta.decode("utf-8").splitlines():
        key, _, value = line.partition(": ")
        if key == "expect":
            vector.expect = value
        elif key == "payload":
            vector.payload = value
        elif key == "identity":
            vector.identities.append(value)
        elif key == "passphrase":
            vector.passphrases.append(value)
        elif key == "armored":
            vector.armored = value == "yes"
        elif key == "compressed":
            assert value == "zlib", f"unknown compression {value!r}"
            compressed = True
    vector.body = zlib.decompress(body) if compressed else body
    assert vector.expect == "success" or vector.expect in EXPECTED_ERRORS, vector.expect
    return vector


def vector_names() -> list[str]:
    if not VECTORS.is_dir():
        return ["<missing>"]
    return sorted(p.name for p in VECTORS.iterdir() if p.is_file() and p.name != "SOURCE.txt")


def pieces(data: bytes) -> list[bytes]:
    out, pos = [], 0
    for size in itertools.cycle(PIECE_SIZES):
        if pos >= len(data):
            return out
        out.append(data[pos : pos + size])
        pos += size
    raise AssertionError("unreachable")


def run(vector: Vector, chunks: list[bytes]) -> tuple[str, AgeError | None]:
    released = hashlib.sha256()
    identities: list[X25519Identity | ScryptIdentity] = []
    identities += [X25519Identity.parse(s) for s in vector.identities]
    identities += [ScryptIdentity(p) for p in vector.passphrases]
    # A few header-failure vectors name no identity; Decryptor insists on one.
    identities = identities or [X25519Identity.generate()]
    try:
        if vector.armored:
            chunks = [dearmor(b"".join(chunks))]
        decryptor = Decryptor(identities)
        for chunk in chunks:
            released.update(decryptor.update(chunk))
        released.update(decryptor.finalize())
    except AgeError as exc:
        return released.hexdigest(), exc
    return released.hexdigest(), None


@pytest.mark.parametrize("name", vector_names())
@pytest.mark.parametrize("feed", ["whole", "pieces"])
def test_vector(name: str, feed: str) -> None:
    if not VECTORS.is_dir():
        pytest.fail(f"age test vectors not found at {VECTORS} (set BACKUPD_AGE_VECTORS to their directory)")
    if name.startswith("hybrid") or name == "armor_hybrid":
        pytest.skip("mlkem768x25519 (hybrid post-quantum) recipients are not implemented")
    vector = load(VECTORS / name)
    chunks = [vector.body] if feed == "whole" else pieces(vector.body)
    digest, error = run(vector, chunks)
    if vector.expect == "success":
        assert error is None, f"expected success, got {type(error).__name__}: {error}"
    else:
        expected = EXPECTED_ERRORS[vector.expect]
        assert isinstance(error, expected), (
            f"expected {expected.__name__}, got {type(error).__name__ if error else 'success'}: {error}"
        )
    assert digest == (vector.payload or EMPTY_SHA256)


def test_every_vector_family_is_present() -> None:
    if not VECTORS.is_dir():
        pytest.fail(f"age test vectors not found at {VECTORS} (set BACKUPD_AGE_VECTORS to their directory)")
    families = {name.split("_")[0] for name in vector_names()}
    assert {"armor", "header", "hmac", "scrypt", "stanza", "stream", "version", "x25519"} <= families
