"""backupd.sshsig against OpenSSH's own `ssh-keygen -Y sign/verify`, both ways, plus the refusals
the repository relies on: forged, altered, moved, truncated, wrong-namespace and wrong-key
signatures, each with its own typed error, and a parser that raises nothing else on any input."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupd import sshsig
from backupd.errors import ConfigError
from backupd.settings import load_settings
from backupd.sshsig import BadArmor, BadSignature, SignatureError, SigningKey, UnknownKey, WrongNamespace

from support import require_tool, run_backupd, write_config

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def ssh_keygen() -> str:
    return require_tool("ssh-keygen")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory, ssh_keygen: str) -> dict[str, Path]:
    """Private key files made by ssh-keygen itself: ed25519, a second ed25519, an rsa key."""
    root = tmp_path_factory.mktemp("keys")
    paths = {}
    for name, argv in {"ed": ["-t", "ed25519"], "other": ["-t", "ed25519"], "rsa": ["-t", "rsa", "-b", "2048"]}.items():
        path = root / name
        subprocess.run([ssh_keygen, "-q", *argv, "-N", "", "-C", f"{name}@test", "-f", str(path)], check=True)
        paths[name] = path
    return paths


def keygen_sign(ssh_keygen: str, key: Path, data: bytes, namespace: str = "backupd") -> str:
    proc = subprocess.run([ssh_keygen, "-q", "-Y", "sign", "-n", namespace, "-f", str(key)], input=data,
                          capture_output=True, check=True)
    return proc.stdout.decode()


def keygen_verify(ssh_keygen: str, tmp_path: Path, data: bytes, signature: str, trusted: list[sshsig.PublicKey],
                  namespace: str = "backupd") -> subprocess.CompletedProcess:
    """`ssh-keygen -Y verify -n NAMESPACE -f allowed_signers -I backupd -s file.sig < file`, as the README says."""
    allowed = tmp_path / "allowed_signers"
    allowed.write_text("".join(f"backupd {key.line()}\n" for key in trusted))
    sig = tmp_path / "file.sig"
    sig.write_text(signature)
    return subprocess.run([require_tool("ssh-keygen"), "-Y", "verify", "-n", namespace, "-f", str(allowed),
                           "-I", "backupd", "-s", str(sig)], input=data, capture_output=True)


def public_of(key: Path) -> sshsig.PublicKey:
    return sshsig.parse_public_key(Path(f"{key}.pub").read_text())


# --- interoperability ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * MiB + 7])
def test_backupd_signs_ssh_keygen_verifies(tmp_path: Path, ssh_keygen: str, size: int) -> None:
    key = SigningKey.generate("backupd@test")
    data = os.urandom(size)
    signature = sshsig.sign(data, key)
    assert signature.startswith("-----BEGIN SSH SIGNATURE-----\n")
    assert signature == sshsig.sign(io.BytesIO(data), key)  # Ed25519 is deterministic: stream == bytes
    proc = keygen_verify(ssh_keygen, tmp_path, data, signature, [key.public])
    assert proc.returncode == 0, proc.stderr
    assert f'Good "backupd" signature for backupd with ED25519 key {key.public.fingerprint}' in proc.stdout.decode()


def test_backupd_signs_with_a_key_ssh_keygen_made(tmp_path: Path, ssh_keygen: str, keys: dict[str, Path]) -> None:
    key = sshsig.load_private_key(keys["ed"])
    assert key.public == public_of(keys["ed"])
    data = b'{"id": "20261205T093000Z"}\n'
    proc = keygen_verify(ssh_keygen, tmp_path, data, sshsig.sign(data, key), [public_of(keys["ed"])])
    assert proc.returncode == 0, proc.stderr


def test_ssh_keygen_signs_backupd_verifies(ssh_keygen: str, keys: dict[str, Path]) -> None:
    data = os.urandom(100_000)
    signature = keygen_sign(ssh_keygen, keys["ed"], data)
    trusted = [public_of(keys["other"]), public_of(keys["ed"])]
    signer = sshsig.verify(data, signature, trusted)
    assert signer == public_of(keys["ed"]) and signer.comment == "ed@test"
    assert sshsig.verify(io.BytesIO(data), signature, trusted) == signer
    assert sshsig.verify_digest(sshsig.sha512(data), signature, trusted) == signer


def test_the_fingerprint_is_the_one_ssh_keygen_prints(ssh_keygen: str, keys: dict[str, Path]) -> None:
    listed = subprocess.run([ssh_keygen, "-l", "-f", f"{keys['ed']}.pub"], capture_output=True, text=True,
                            check=True).stdout.split()
    assert listed[1] == public_of(keys["ed"]).fingerprint


def test_signing_key_round_trips_through_the_openssh_format(tmp_path: Path, ssh_keygen: str) -> None:
    key = SigningKey.generate()
    path = tmp_path / "key"
    path.write_text(key.to_openssh())
    path.chmod(0o600)
    assert key.to_openssh().startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert sshsig.load_private_key(path).public == key.public
    derived = subprocess.run([ssh_keygen, "-y", "-f", str(path)], capture_output=True, text=True, check=True)
    assert sshsig.parse_public_key(derived.stdout) == key.public


# --- keys generate --signing -----------------------------------------------------------------------


def test_keys_generate_signing_writes_an_openssh_key(tmp_path: Path, ssh_keygen: str) -> None:
    path = tmp_path / "signing.key"
    result = run_backupd("keys", "generate", "--signing", "-o", str(path), check=True)
    assert result.out == ""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    line = result.err.split("Public key: ")[1].strip()
    assert line.startswith("ssh-ed25519 AAAA") and line.endswith(f" backupd@{socket.gethostname()}")
    derived = subprocess.run([ssh_keygen, "-y", "-f", str(path)], capture_output=True, text=True, check=True)
    assert derived.stdout.split()[:2] == line.split()[:2]

    before = path.read_bytes()
    again = run_backupd("keys", "generate", "--signing", "-o", str(path))
    assert again.code == 2 and "file exists; refusing to overwrite a key file" in again.err
    assert path.read_bytes() == before


def test_keys_generate_signing_to_stdout(tmp_path: Path) -> None:
    result = run_backupd("keys", "generate", "--signing", check=True)
    assert result.out.startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    path = tmp_path / "key"
    path.write_text(result.out)
    line = result.err.split("Public key: ")[1].strip()
    assert sshsig.load_private_key(path).public == sshsig.parse_public_key(line)


def test_load_private_key_names_what_is_wrong(tmp_path: Path, ssh_keygen: str, keys: dict[str, Path]) -> None:
    locked = tmp_path / "locked"
    subprocess.run([ssh_keygen, "-q", "-t", "ed25519", "-N", "secret phrase", "-f", str(locked)], check=True)
    garbage = tmp_path / "garbage"
    garbage.write_text("age-secret-key-1...\n")
    cases = {locked: "encrypted with a passphrase", keys["rsa"]: "only Ed25519 keys are supported",
             garbage: "not an OpenSSH private key", tmp_path / "missing": "file not found"}
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=message) as caught:
            sshsig.load_private_key(path)
        assert str(path) in str(caught.value)


# --- refusals --------------------------------------------------------------------------------------


DATA = b'{"id": "20261205T093000Z", "streams": [{"sha256": "..."}]}\n'


@pytest.fixture(scope="module")
def signer() -> SigningKey:
    return SigningKey.generate("backupd@host-a")


def _blob(armored: str) -> bytes:
    return base64.b64decode("".join(armored.strip().splitlines()[1:-1]))


def _armor(blob: bytes) -> str:
    encoded = base64.b64encode(blob).decode()
    return "-----BEGIN SSH SIGNATURE-----\n" + "\n".join(
        encoded[i:i + 70] for i in range(0, len(encoded), 70)) + "\n-----END SSH SIGNATURE-----\n"


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _forged(key: sshsig.PublicKey, signature: bytes, namespace: bytes = b"backupd", version: int = 1) -> str:
    """A signature blob built by hand, as an attacker without the private key would."""
    return _armor(b"SSHSIG" + struct.pack(">I", version) + _string(key.blob) + _string(namespace) + _string(b"")
                  + _string(b"sha512") + _string(_string(b"ssh-ed25519") + _string(signature)))


def _mangled(armored: str) -> str:
    blob = bytearray(_blob(armored))
    blob[-1] ^= 0x01  # the last byte of the Ed25519 signature
    return _armor(bytes(blob))


def refusal_cases(signer: SigningKey, keygen_other: str) -> dict[str, tuple[bytes, str, type[SignatureError], str]]:
    good = sshsig.sign(DATA, signer)
    other_manifest = DATA.replace(b"093000", b"101500")
    return {
        "forged from scratch": (DATA, _forged(signer.public, os.urandom(64)), BadSignature,
                                "does not match the data"),
        "data altered": (DATA + b" ", good, BadSignature, "does not match the data"),
        "moved from another manifest": (other_manifest, good, BadSignature, "does not match the data"),
        "signature mangled": (DATA, _mangled(good), BadSignature, "does not match the data"),
        "another host's key": (DATA, sshsig.sign(DATA, SigningKey.generate()), UnknownKey,
                               "not a trusted key"),
        "an ssh-keygen key not trusted": (DATA, keygen_other, UnknownKey, "not a trusted key"),
        "wrong namespace": (DATA, sshsig.sign(DATA, signer, namespace="file"), WrongNamespace,
                            "signed for namespace 'file', not 'backupd'"),
        "truncated armor": (DATA, good[: len(good) // 2], BadArmor, "truncated"),
        "truncated blob": (DATA, _armor(_blob(good)[:-10]), BadArmor, "truncated or malformed"),
        "trailing bytes": (DATA, _armor(_blob(good) + b"\0"), BadArmor, "unexpected bytes"),
        "not armored": (DATA, "ssh-ed25519 AAAA\n", BadArmor, "not an SSH signature"),
        "empty": (DATA, "", BadArmor, "not an SSH signature"),
        "damaged base64": (DATA, good.replace(good.splitlines()[1][:4], "!!!!", 1), BadArmor, "base64"),
        "version 2": (DATA, _forged(signer.public, os.urandom(64), version=2), BadArmor, "version 2"),
        "huge": (DATA, _armor(_blob(good) + bytes(8000)), BadArmor, "larger than"),
    }


def test_every_forgery_is_refused_with_its_own_error(tmp_path: Path, ssh_keygen: str, keys: dict[str, Path],
                                                      signer: SigningKey) -> None:
    cases = refusal_cases(signer, keygen_sign(ssh_keygen, keys["other"], DATA))
    for name, (data, signature, error, message) in cases.items():
        with pytest.raises(error, match=message) as caught:
            sshsig.verify(data, signature, [signer.public, public_of(keys["ed"])], what="db/x/manifest.json.sig")
        assert str(caught.value).startswith("db/x/manifest.json.sig: "), name
        # OpenSSH agrees: none of them verifies with ssh-keygen either.
        proc = keygen_verify(ssh_keygen, tmp_path, data, signature, [signer.public, public_of(keys["ed"])])
        assert proc.returncode != 0, name


def test_an_rsa_signature_is_an_unknown_key(ssh_keygen: str, keys: dict[str, Path], signer: SigningKey) -> None:
    signature = keygen_sign(ssh_keygen, keys["rsa"], DATA)
    with pytest.raises(UnknownKey, match="signed by a 'rsa-sha2-512' key|signed by a 'ssh-rsa' key"):
        sshsig.verify(DATA, signature, [signer.public])


def test_no_trusted_keys_trusts_nothing(signer: SigningKey) -> None:
    with pytest.raises(UnknownKey, match=r"\(0 trusted\)"):
        sshsig.verify(DATA, sshsig.sign(DATA, signer), [])


def test_the_key_is_checked_before_the_data_is_read(signer: SigningKey) -> None:
    class Unreadable(io.RawIOBase):
        def read(self, size: int = -1) -> bytes:
            raise AssertionError("read the data of a signature from an untrusted key")

    with pytest.raises(UnknownKey):
        sshsig.verify(Unreadable(), sshsig.sign(DATA, SigningKey.generate()), [signer.public])


def test_verify_digest_takes_a_streamed_sha512(signer: SigningKey) -> None:
    signature = sshsig.sign_digest(sshsig.sha512(io.BytesIO(DATA)), signer)
    assert sshsig.verify(DATA, signature, [signer.public]) == signer.public
    with pytest.raises(BadSignature):
        sshsig.verify_digest(sshsig.sha512(DATA + b"x"), signature, [signer.public])


# --- fuzz: the parser raises SignatureError or nothing ---------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(
    st.binary(max_size=2000),
    st.text(max_size=2000).map(str.encode),
    st.binary(max_size=600).map(lambda b: _armor(b"SSHSIG" + b).encode()),
    st.binary(max_size=600).map(lambda b: _armor(b).encode()),
))
def test_fuzzed_input_raises_only_signature_errors(text: bytes) -> None:
    key = SigningKey.generate()
    with pytest.raises(SignatureError):
        sshsig.verify(DATA, text, [key.public])
    try:
        sshsig.verify(DATA, text.decode("latin-1"), [key.public])
    except SignatureError:
        pass


_GOOD_KEY = SigningKey.generate("fuzz")
_GOOD = _blob(sshsig.sign(DATA, _GOOD_KEY))


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_any_change_to_a_good_signature_is_refused(data: st.DataObject) -> None:
    blob = bytearray(_GOOD)
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "splice"]))
    if kind == "flip":
        index = data.draw(st.integers(0, len(blob) - 1))
        blob[index] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del blob[data.draw(st.integers(0, len(blob) - 1)):]
    elif kind == "insert":
        index = data.draw(st.integers(0, len(blob)))
        blob[index:index] = data.draw(st.binary(min_size=1, max_size=40))
    else:
        start = data.draw(st.integers(0, len(blob) - 1))
        end = data.draw(st.integers(start, len(blob)))
        replacement = data.draw(st.binary(max_size=40))
        if bytes(blob[start:end]) == replacement:
            return
        blob[start:end] = replacement
    with pytest.raises(SignatureError):
        sshsig.verify(DATA, _armor(bytes(blob)), [_GOOD_KEY.public])


# --- configuration ---------------------------------------------------------------------------------


def _config(tmp_path: Path, signing: dict[str, object], job: dict[str, object] | None = None) -> dict:
    data: dict = {"storage": {"local": {"type": "filesystem", "path": str(tmp_path / "repo")}},
                  "signing": signing}
    if job is not None:
        data["jobs"] = {"db": {"driver": "sqlite", "storage": "local", "path": str(tmp_path / "x.db"), **job}}
    return data


def test_settings_trusted_keys(tmp_path: Path) -> None:
    a, b = SigningKey.generate("a@host"), SigningKey.generate("b@host")
    settings = load_settings(data=_config(tmp_path, {"key_file": str(tmp_path / "key"),
                                                     "trusted_keys": [a.public.line(), b.public.line()]},
                                          {"trusted_keys": [b.public.line()]}))
    assert settings.signing.public_keys() == [a.public, b.public]
    assert settings.trusted_keys("db") == [b.public]
    assert settings.signing.key_file == tmp_path / "key"
    unset = load_settings(data=_config(tmp_path, {"trusted_keys": [a.public.line()]}, {}))
    assert unset.trusted_keys("db") == [a.public]
    assert load_settings(data=_config(tmp_path, {}, {})).trusted_keys("db") == []


def test_bad_trusted_keys_are_config_errors_naming_the_key(tmp_path: Path) -> None:
    a, b = SigningKey.generate("a@host"), SigningKey.generate("b@host")
    with pytest.raises(ConfigError) as caught:
        load_settings(data=_config(tmp_path, {"trusted_keys": [a.public.line(), "ssh-ed25519 AAAAbroken x",
                                                               "ssh-rsa AAAAB3NzaC1yc2E x", "nonsense"]},
                                   {"trusted_keys": []}))
    errors = caught.value.errors
    assert any(e.startswith("signing.trusted_keys.1: not a valid ssh-ed25519 public key") for e in errors), errors
    assert any(e.startswith("signing.trusted_keys.2: only ssh-ed25519 keys are supported, not ssh-rsa")
               for e in errors), errors
    assert any(e.startswith("signing.trusted_keys.3: not an OpenSSH public key line") for e in errors), errors
    assert any(e.startswith("jobs.db.trusted_keys: must not be empty") for e in errors), errors

    with pytest.raises(ConfigError) as caught:
        load_settings(data=_config(tmp_path, {"trusted_keys": [a.public.line()]}, {"trusted_keys": [b.public.line()]}))
    assert caught.value.errors == [
        f"jobs.db.trusted_keys.0: {b.public} is not in signing.trusted_keys (a job's list narrows that one) "
        f"(got {b.public.line()!r})"]


def _signing_check(tmp_path: Path, signing: dict[str, object]) -> dict:
    config = write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.local": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "signing": signing})
    result = run_backupd("check", "--json", config=config)
    return next(c for c in json.loads(result.out)["checks"] if c["name"] == "signing.key_file")


def test_check_reports_the_signing_key(tmp_path: Path) -> None:
    key_file = tmp_path / "signing.key"
    result = run_backupd("keys", "generate", "--signing", "-o", str(key_file), check=True)
    line = result.err.split("Public key: ")[1].strip()
    public = sshsig.parse_public_key(line)
    other = SigningKey.generate("other@host").public.line()

    check = _signing_check(tmp_path, {"key_file": str(key_file), "trusted_keys": [other, line]})
    assert check["status"] == "ok" and check["detail"] == f"{key_file}: mode 0600, {public}, trusted"

    check = _signing_check(tmp_path, {"key_file": str(key_file), "trusted_keys": [other]})
    assert check["status"] == "fail"
    assert f"its public key ssh-ed25519 {public.fingerprint} is not in signing.trusted_keys" in check["detail"]

    key_file.chmod(0o640)
    check = _signing_check(tmp_path, {"key_file": str(key_file), "trusted_keys": [line]})
    assert check["status"] == "fail" and "accessible by group or others (mode 0640)" in check["detail"]

    check = _signing_check(tmp_path, {"key_file": str(tmp_path / "missing"), "trusted_keys": [line]})
    assert check["status"] == "fail" and "file not found" in check["detail"]

    check = _signing_check(tmp_path, {})
    assert check["status"] == "warn" and "not signed" in check["detail"]
    check = _signing_check(tmp_path, {"trusted_keys": [line]})
    assert check["status"] == "ok" and "only reads" in check["detail"]


def test_the_signing_key_is_hidden_from_scratch_sandboxes(tmp_path: Path) -> None:
    from backupd.context import JobContext

    key_file = tmp_path / "keys" / "signing.key"
    settings = load_settings(data=_config(tmp_path, {"key_file": str(key_file)}, {}))
    assert key_file in JobContext(settings, "db").sandbox_policy().hidden
