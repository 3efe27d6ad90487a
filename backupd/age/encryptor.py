"""Incremental age encryption."""

from __future__ import annotations

import os
from collections.abc import Sequence

from backupd.age.errors import AgeError
from backupd.age.header import encode_header
from backupd.age.recipients import FILE_KEY_SIZE, Recipient
from backupd.age.stream import NONCE_SIZE, StreamSealer, payload_key

Bytes = bytes | bytearray | memoryview


class Encryptor:
    """enc = Encryptor(recipients); out = enc.update(data) ...; out += enc.finalize()

    The header is emitted with the first update()/finalize() output; update()
    holds back at most one 64 KiB chunk, which might be the final one."""

    def __init__(self, recipients: Sequence[Recipient]) -> None:
        if not recipients:
            raise AgeError("no recipients given")
        file_key = os.urandom(FILE_KEY_SIZE)
        stanzas = [stanza for recipient in recipients for stanza in recipient.wrap(file_key)]
        if len(stanzas) > 1 and any(stanza.type == "scrypt" for stanza in stanzas):
            raise AgeError("a passphrase (scrypt) recipient must be the only recipient")
        nonce = os.urandom(NONCE_SIZE)
        self._prefix: bytes | None = encode_header(stanzas, file_key) + nonce
        self._sealer: StreamSealer | None = StreamSealer(payload_key(file_key, nonce))

    def _start(self) -> tuple[StreamSealer, list[bytes]]:
        if self._sealer is None:
            raise AgeError("Encryptor used after finalize()")
        out = []
        if self._prefix is not None:
            out.append(self._prefix)
            self._prefix = None
        return self._sealer, out

    def update(self, data: Bytes) -> bytes:
        sealer, out = self._start()
        sealer.update(data, out)
        return b"".join(out)

    def finalize(self) -> bytes:
        sealer, out = self._start()
        sealer.finalize(out)
        self._sealer = None
        return b"".join(out)


def encrypt(recipients: Sequence[Recipient], plaintext: Bytes) -> bytes:
    encryptor = Encryptor(recipients)
    return encryptor.update(plaintext) + encryptor.finalize()
