"""Helpers for the signing tests: a host's signing key in a config, and forgeries as an attacker who can
write the repository (but holds no trusted signing key) makes them."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from pathlib import Path

from backupd import age
from backupd.manifest import Manifest
from backupd.pipeline import encode_bytes
from backupd.sshsig import SigningKey
from backupd.storage import Storage
from backupd.timeutil import parse_timestamp
from support import write_config


def signing_key_file(path: Path, key: SigningKey) -> Path:
    """``key`` written as a host's ``signing.key_file`` (OpenSSH private key, 0600)."""
    path.write_text(key.to_openssh())
    path.chmod(0o600)
    return path


def add_signing(config: Path, trusted: list[str], key_file: Path | None = None) -> Path:
    """Put a ``[signing]`` table (``trusted_keys`` lines, and ``key_file`` when given) in front of ``config``."""
    table: dict[str, object] = {"trusted_keys": trusted}
    if key_file is not None:
        table["key_file"] = str(key_file)
    signing = write_config(config.with_name(config.stem + "-signing.toml"), {"signing": table}).read_text()
    config.write_text(signing + "\n" + config.read_text())
    return config


def read(storage: Storage, key: str) -> bytes:
    handle = storage.open(key)
    try:
        return handle.read()
    finally:
        handle.close()


def forge_backup(storage: Storage, job: str, after: str, plaintext: bytes, recipient: str,
                 later: dt.timedelta) -> tuple[str, bytes]:
    """A backup of ``job`` written by an attacker, started ``later`` than backup ``after``: ``plaintext`` as its
    stream, valid age to the job's recipient with the right sizes and sha256, in a manifest copied
    from the real one. Returns its id and its manifest's bytes."""
    stored = encode_bytes(plaintext, [age.X25519Recipient.parse(recipient)])
    real = json.loads(read(storage, f"{job}/backups/{after}/manifest.json"))
    moment = parse_timestamp(real["started_at"]) + later
    backup_id = moment.strftime("%Y%m%dT%H%M%SZ")
    real.update(backup_id=backup_id, started_at=moment.isoformat(), finished_at=moment.isoformat())
    real["objects"] = [{**real["objects"][0], "raw_size": len(plaintext), "stored_size": len(stored),
                        "sha256": hashlib.sha256(stored).hexdigest()}]
    manifest = Manifest.from_dict(real).to_json()
    storage.put(f"{job}/backups/{backup_id}/{real['objects'][0]['key']}", io.BytesIO(stored))
    storage.put(f"{job}/backups/{backup_id}/manifest.json", io.BytesIO(manifest))
    return backup_id, manifest
