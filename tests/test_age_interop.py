"""backupd.age against the reference `age` CLI (Debian's age 1.1.1), plus the
failure behaviour the pipeline relies on: wrong keys, corruption, truncation."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from backupd.age import (
    AgeError,
    Decryptor,
    Encryptor,
    HeaderError,
    HmacError,
    NoIdentityMatch,
    PayloadError,
    ScryptIdentity,
    ScryptRecipient,
    X25519Identity,
    X25519Recipient,
    armor,
    dearmor,
    decrypt,
    encrypt,
    load_identities,
    parse_identities,
    parse_recipient,
)

AGE = shutil.which("age")
AGE_KEYGEN = shutil.which("age-keygen")
SETSID = shutil.which("setsid")
MiB = 1024 * 1024
CHUNK = 64 * 1024
SEALED = CHUNK + 16
SIZES = [0, 1, CHUNK, CHUNK + 1, 3 * MiB]
_PROMPT = re.compile(rb"(Enter|Confirm) passphrase[^:\r\n]*: ")


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def payload_size(plain: int) -> int:
    chunks = max(1, -(-plain // CHUNK))
    return 16 + plain + 16 * chunks


def header_size(ciphertext: bytes) -> int:
    return ciphertext.index(b"\n--- ") + 1 + len(b"--- ") + 43 + 1


def pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos = [], 0
    for size in itertools.cycle(sizes):
        if pos >= len(data):
            return out
        out.append(data[pos : pos + size])
        pos += size
    raise AssertionError("unreachable")


def decrypt_in(identities: list, chunks: list[bytes]) -> bytes:
    decryptor = Decryptor(identities)
    out = [decryptor.update(chunk) for chunk in chunks]
    out.append(decryptor.finalize())
    return b"".join(out)


@pytest.fixture(scope="module")
def age_cli() -> str:
    if AGE is None or AGE_KEYGEN is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the age and age-keygen CLIs must be installed in CI (Debian package 'age')")
        pytest.skip("age CLI not installed")
    return AGE


def keygen(path: Path) -> X25519Recipient:
    assert AGE_KEYGEN is not None
    subprocess.run([AGE_KEYGEN, "-o", str(path)], check=True, capture_output=True)
    public = subprocess.run([AGE_KEYGEN, "-y", str(path)], check=True, capture_output=True, text=True)
    return parse_recipient(public.stdout.strip())


@pytest.fixture(scope="module")
def keys(age_cli: str, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, X25519Recipient]]:
    directory = tmp_path_factory.mktemp("age-keys")
    return [(directory / f"key{i}.txt", keygen(directory / f"key{i}.txt")) for i in range(2)]


def age_decrypt(ciphertext: bytes, *keyfiles: Path) -> bytes:
    assert AGE is not None
    argv = [AGE, "--decrypt"] + [arg for k in keyfiles for arg in ("-i", str(k))]
    proc = subprocess.run(argv, input=ciphertext, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def age_encrypt(plaintext: bytes, *recipients: X25519Recipient, armored: bool = False) -> bytes:
    assert AGE is not None
    argv = [AGE, "--encrypt"] + [arg for r in recipients for arg in ("-r", str(r))]
    proc = subprocess.run(argv + (["--armor"] if armored else []), input=plaintext, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def age_on_tty(argv: list[str], passphrase: str, timeout: float = 60.0) -> tuple[int, str]:
    """age reads passphrases from its controlling terminal only: give it a pty."""
    if SETSID is None:
        pytest.skip("setsid (util-linux) is needed to give age a controlling terminal")
    master, slave = os.openpty()
    proc = subprocess.Popen([SETSID, "--ctty", "--wait", *argv], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    seen, answered = bytearray(), 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                seen += data
                prompts = len(_PROMPT.findall(seen))
                for _ in range(prompts - answered):
                    os.write(master, passphrase.encode() + b"\n")
                answered = prompts
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), seen.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


# --- interoperability with the age CLI ---------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_backupd_encrypts_age_decrypts(keys, size: int) -> None:
    (keyfile, recipient), _ = keys
    plaintext = random_bytes(size)
    ciphertext = encrypt([recipient], plaintext)
    assert len(ciphertext) == header_size(ciphertext) + payload_size(size)
    assert age_decrypt(ciphertext, keyfile) == plaintext


@pytest.mark.parametrize("size", SIZES)
def test_age_encrypts_backupd_decrypts(age_cli, size: int) -> None:
    identity = X25519Identity.generate()
    plaintext = random_bytes(size)
    ciphertext = age_encrypt(plaintext, identity.to_recipient())
    assert decrypt_in([identity], pieces(ciphertext, [MiB])) == plaintext
    assert decrypt_in([identity], pieces(ciphertext, [1, 4093, SEALED, 65535, 3])) == plaintext


def test_keys_agree_with_age_keygen(keys, tmp_path: Path) -> None:
    for keyfile, recipient in keys:
        (identity,) = load_identities(keyfile)
        assert identity.to_recipient() == recipient
        assert str(recipient).startswith("age1")
        assert str(identity) in keyfile.read_text()
    ours = X25519Identity.generate()
    path = tmp_path / "ours.txt"
    path.write_text(f"# generated by backupd\n{ours}\n")
    public = subprocess.run([AGE_KEYGEN, "-y", str(path)], check=True, capture_output=True, text=True)
    assert public.stdout.strip() == str(ours.to_recipient())


def test_multiple_recipients_backupd_to_age(keys, tmp_path: Path) -> None:
    ours = X25519Identity.generate()
    ours_file = tmp_path / "ours.txt"
    ours_file.write_text(f"{ours}\n")
    plaintext = random_bytes(200_000)
    ciphertext = encrypt([keys[0][1], ours.to_recipient(), keys[1][1]], plaintext)
    assert ciphertext.count(b"\n-> X25519 ") == 3
    for keyfile in (keys[0][0], keys[1][0], ours_file):
        assert age_decrypt(ciphertext, keyfile) == plaintext
    assert decrypt([ours], ciphertext) == plaintext


def test_multiple_recipients_age_to_backupd(age_cli) -> None:
    identities = [X25519Identity.generate() for _ in range(3)]
    plaintext = random_bytes(CHUNK * 2 + 5)
    ciphertext = age_encrypt(plaintext, *(i.to_recipient() for i in identities))
    for identity in identities:
        assert decrypt([identity], ciphertext) == plaintext
    assert decrypt([X25519Identity.generate(), identities[2]], ciphertext) == plaintext


def test_scrypt_backupd_encrypts_age_decrypts(age_cli, tmp_path: Path) -> None:
    plaintext = random_bytes(CHUNK + 3)
    encrypted = tmp_path / "secret.age"
    encrypted.write_bytes(encrypt([ScryptRecipient("correct horse battery", work_factor=12)], plaintext))
    out = tmp_path / "plain"
    status, transcript = age_on_tty([age_cli, "-d", "-o", str(out), str(encrypted)], "correct horse battery")
    assert status == 0, transcript
    assert out.read_bytes() == plaintext
    status, transcript = age_on_tty([age_cli, "-d", "-o", str(tmp_path / "x"), str(encrypted)], "wrong")
    assert status != 0 and "incorrect passphrase" in transcript


def test_scrypt_age_encrypts_backupd_decrypts(age_cli, tmp_path: Path) -> None:
    plaintext = random_bytes(100_000)
    (tmp_path / "plain").write_bytes(plaintext)
    encrypted = tmp_path / "secret.age"
    status, transcript = age_on_tty(
        [age_cli, "-p", "-o", str(encrypted), str(tmp_path / "plain")], "s3cr3t ü"
    )
    assert status == 0, transcript
    ciphertext = encrypted.read_bytes()
    assert b"\n-> scrypt " in ciphertext
    assert decrypt([ScryptIdentity("s3cr3t ü")], ciphertext) == plaintext
    with pytest.raises(NoIdentityMatch):
        decrypt([ScryptIdentity("s3cr3t u")], ciphertext)
    with pytest.raises(NoIdentityMatch):
        decrypt([X25519Identity.generate()], ciphertext)


def test_odd_sized_updates_decrypt_with_age(keys) -> None:
    (keyfile, recipient), _ = keys
    plaintext = random_bytes(3 * MiB + 12345)
    sizes = [1, 65535, 65537, 1, 2 * CHUNK, 7, CHUNK, CHUNK - 1, MiB + 1]
    encryptor = Encryptor([recipient])
    out, fed = [], 0
    for piece in pieces(plaintext, sizes):
        out.append(encryptor.update(piece))
        fed += len(piece)
        sealed = sum(map(len, out)) - header_size(out[0]) - 16
        assert sealed % SEALED == 0  # only whole, non-final chunks so far
        assert fed - sealed // SEALED * CHUNK <= CHUNK  # at most one chunk held back
    out.append(encryptor.finalize())
    ciphertext = b"".join(out)
    assert len(ciphertext) == header_size(ciphertext) + payload_size(len(plaintext))
    assert age_decrypt(ciphertext, keyfile) == plaintext


def test_armor_interop(keys) -> None:
    (keyfile, recipient), _ = keys
    identity = load_identities(keyfile)
    plaintext = random_bytes(1000)
    armored = age_encrypt(plaintext, recipient, armored=True)
    assert armored.startswith(b"-----BEGIN AGE ENCRYPTED FILE-----\n")
    assert decrypt(identity, dearmor(armored)) == plaintext
    assert age_decrypt(armor(encrypt([recipient], plaintext)), keyfile) == plaintext


def test_age_rejects_what_backupd_rejects(keys) -> None:
    (keyfile, recipient), _ = keys
    ciphertext = bytearray(encrypt([recipient], random_bytes(CHUNK * 2)))
    ciphertext[-100] ^= 1
    proc = subprocess.run([AGE, "-d", "-i", str(keyfile)], input=bytes(ciphertext), capture_output=True)
    assert proc.returncode != 0
    with pytest.raises(PayloadError):
        decrypt(load_identities(keyfile), bytes(ciphertext))


# --- keys and identity files ---------------------------------------------------


def test_identity_file_parsing(tmp_path: Path) -> None:
    first, second = X25519Identity.generate(), X25519Identity.generate()
    text = f"# created: 2026-11-24T18:00:00Z\n# public key: {first.to_recipient()}\n{first}\n\n  \r\n{second}\r\n"
    parsed = parse_identities(text)
    assert [str(i) for i in parsed] == [str(first), str(second)]

    bad = f"# comment\n\n{first}\nAGE-SECRET-KEY-1NOTAKEY\n"
    with pytest.raises(AgeError, match=r"line 4\b"):
        parse_identities(bad)
    with pytest.raises(AgeError, match=r"line 2\b.*uppercase"):
        parse_identities(f"{first}\n{str(second).lower()}\n")
    with pytest.raises(AgeError, match="line 1"):
        parse_identities(str(first.to_recipient()))
    with pytest.raises(AgeError, match="no secret keys"):
        parse_identities("# only comments\n\n")

    path = tmp_path / "keys.txt"
    path.write_text(bad)
    with pytest.raises(AgeError, match=r"keys\.txt.*line 4") as excinfo:
        load_identities(path)
    assert str(first) not in str(excinfo.value)
    with pytest.raises(AgeError, match=r"missing\.txt"):
        load_identities(tmp_path / "missing.txt")


def test_secret_keys_stay_out_of_errors_and_repr() -> None:
    identity = X25519Identity.generate()
    secret = str(identity)
    assert secret.startswith("AGE-SECRET-KEY-1") and secret == secret.upper()
    assert secret not in repr(identity)
    corrupted = secret[:-1] + ("Q" if secret[-1] != "Q" else "P")
    with pytest.raises(AgeError) as excinfo:
        X25519Identity.parse(corrupted)
    assert corrupted not in str(excinfo.value)
    with pytest.raises(AgeError, match="secret key"):
        parse_recipient(secret)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "age1",
        "not a key",
        "age1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq",  # bad checksum
        "AGE1ZVKYG2LQZRAA2LNJVQEJ32NKUU0UES2S82HZRYE869XEEXVN73EQUNUJWJ",  # uppercase recipient
        "Age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj",  # mixed case
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB",
        "age1pq1x34nzsvr0rxjsgdn8zgyhfe8j7ceq5r9rdelkjuh3y235jzxshfg87pzf5zr",
    ],
)
def test_recipient_parse_errors(text: str) -> None:
    with pytest.raises(AgeError, match="recipient"):
        parse_recipient(text)


def test_recipient_round_trip() -> None:
    spec_example = "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj"
    assert str(parse_recipient(spec_example)) == spec_example
    identity = X25519Identity.parse(
        "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX"
    )
    assert str(identity.to_recipient()) == spec_example


# --- failures the pipeline must see -------------------------------------------


def test_wrong_identity_is_no_match(keys) -> None:
    (_, recipient), (other_keyfile, _) = keys
    from_backupd = encrypt([recipient], b"data")
    from_age = age_encrypt(b"data", recipient)
    for ciphertext in (from_backupd, from_age):
        with pytest.raises(NoIdentityMatch, match="no identity matched any of the recipients"):
            decrypt([*load_identities(other_keyfile), X25519Identity.generate()], ciphertext)
        with pytest.raises(NoIdentityMatch):
            decrypt([ScryptIdentity("password")], ciphertext)


def test_flipped_payload_byte_is_payload_error() -> None:
    identity = X25519Identity.generate()
    plaintext = random_bytes(3 * CHUNK + 10)
    ciphertext = encrypt([identity.to_recipient()], plaintext)
    start = header_size(ciphertext)
    for offset in (start, start + 16, start + 16 + SEALED + 5, len(ciphertext) - 1):
        corrupted = bytearray(ciphertext)
        corrupted[offset] ^= 0x40
        with pytest.raises(PayloadError):
            decrypt([identity], bytes(corrupted))
        # Chunks before the damaged one were authenticated and are released.
        decryptor, released = Decryptor([identity]), bytearray()
        with pytest.raises(PayloadError):
            for piece in pieces(bytes(corrupted), [1000]):
                released += decryptor.update(piece)
            released += decryptor.finalize()
        assert plaintext.startswith(released)
        assert len(released) <= max(0, (offset - start - 16) // SEALED * CHUNK)


def test_modified_header_is_header_or_hmac_error() -> None:
    identity = X25519Identity.generate()
    ciphertext = encrypt([identity.to_recipient()], b"payload")
    header_end = header_size(ciphertext)
    mac_at = header_end - 44
    forged = ciphertext[:mac_at] + b"A" * 43 + ciphertext[header_end - 1 :]
    with pytest.raises(HmacError):
        decrypt([identity], forged)
    grease = ciphertext.replace(b"\n---", b"\n-> grease\n\n---", 1)
    with pytest.raises(HmacError):
        decrypt([identity], grease)
    with pytest.raises(HeaderError):
        decrypt([identity], ciphertext.replace(b"\n", b"\r\n", 1))
    with pytest.raises(HeaderError):
        decrypt([identity], b"age-encryption.org/v2\n" + ciphertext[22:])
    with pytest.raises(HeaderError, match="not an age file"):
        Decryptor([identity]).update(b"\x28\xb5\x2f\xfd zstd data, not age")


@pytest.mark.parametrize("plain_size", [0, 100, CHUNK, 3 * CHUNK])
def test_truncation_is_detected(plain_size: int) -> None:
    identity = X25519Identity.generate()
    ciphertext = encrypt([identity.to_recipient()], random_bytes(plain_size))
    start = header_size(ciphertext)
    cuts = {len(ciphertext) - 1, len(ciphertext) - 16, start + 16, start + 16 + SEALED}
    for cut in sorted(c for c in cuts if start + 16 <= c < len(ciphertext)):
        with pytest.raises(PayloadError):
            decrypt([identity], ciphertext[:cut])
    for cut in (0, 10, start - 1, start, start + 15):
        with pytest.raises(HeaderError):
            decrypt([identity], ciphertext[:cut])


def test_trailing_data_is_payload_error_after_release() -> None:
    identity = X25519Identity.generate()
    plaintext = random_bytes(2 * CHUNK)
    ciphertext = encrypt([identity.to_recipient()], plaintext)
    decryptor = Decryptor([identity])
    released = decryptor.update(ciphertext + b"garbage")
    assert released == plaintext  # authenticated, including the final chunk
    with pytest.raises(PayloadError, match="trailing data"):
        decryptor.finalize()
    with pytest.raises(PayloadError):
        decrypt([identity], ciphertext + b"\0")


def test_decryptor_releases_plaintext_chunk_by_chunk() -> None:
    identity = X25519Identity.generate()
    plaintext = random_bytes(3 * MiB)
    ciphertext = encrypt([identity.to_recipient()], plaintext)
    start = header_size(ciphertext) + 16
    decryptor, released, fed = Decryptor([identity]), 0, 0
    for piece in pieces(ciphertext, [100_000]):
        released += len(decryptor.update(piece))
        fed += len(piece)
        complete_chunks = max(0, fed - start) // SEALED
        assert released >= (complete_chunks - 1) * CHUNK
    assert released + len(decryptor.finalize()) == len(plaintext)


def test_round_trip_boundaries_and_hash() -> None:
    identity = X25519Identity.generate()
    for size in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1):
        plaintext = random_bytes(size)
        ciphertext = encrypt([identity.to_recipient()], plaintext)
        for sizes in ([1], [SEALED], [SEALED - 1], [SEALED + 1], [7, CHUNK]):
            if size > CHUNK and sizes == [1]:
                continue
            digest = hashlib.sha256(decrypt_in([identity], pieces(ciphertext, sizes))).digest()
            assert digest == hashlib.sha256(plaintext).digest(), (size, sizes)


def test_api_misuse() -> None:
    identity = X25519Identity.generate()
    with pytest.raises(AgeError, match="only recipient"):
        Encryptor([ScryptRecipient("pw", work_factor=1), identity.to_recipient()])
    with pytest.raises(AgeError):
        Encryptor([])
    with pytest.raises(AgeError):
        Decryptor([])
    with pytest.raises(AgeError):
        ScryptRecipient("")
    encryptor = Encryptor([identity.to_recipient()])
    encryptor.finalize()
    with pytest.raises(AgeError, match="after finalize"):
        encryptor.update(b"more")
