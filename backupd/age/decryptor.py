"""Incremental age decryption."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from backupd.age.errors import AgeError, HeaderError, HmacError, NoIdentityMatch
from backupd.age.header import HeaderParser, header_mac
from backupd.age.recipients import FILE_KEY_SIZE, Identity
from backupd.age.stream import NONCE_SIZE, StreamOpener, payload_key

Bytes = bytes | bytearray | memoryview


def _unlock(header: HeaderParser, identities: Sequence[Identity]) -> bytes:
    stanzas = header.stanzas
    if len(stanzas) > 1 and any(stanza.type == "scrypt" for stanza in stanzas):
        raise HeaderError("a scrypt stanza must be the only stanza in the header")
    for identity in identities:
        file_key = identity.unwrap(stanzas)
        if file_key is not None:
            break
    else:
        raise NoIdentityMatch()
    if len(file_key) != FILE_KEY_SIZE:
        raise HeaderError("unwrapped file key has the wrong length")
    if not hmac.compare_digest(header_mac(file_key, header.signed), header.mac):
        raise HmacError("header MAC mismatch: the header is corrupt or was tampered with")
    return file_key


class Decryptor:
    """dec = Decryptor(identities); plain = dec.update(ciphertext) ...; plain += dec.finalize()

    The header is buffered until complete; plaintext is released chunk by chunk
    once authenticated, holding back one chunk until it is known whether it is
    the final one. finalize() raises PayloadError on a truncated file.

    Errors are sticky. When an error is found after plaintext was authenticated
    in the same update() (a final chunk followed by trailing data), that
    plaintext is returned and the error is raised by the next call, which is at
    the latest finalize()."""

    def __init__(self, identities: Sequence[Identity]) -> None:
        if not identities:
            raise AgeError("no identities given")
        self._identities = list(identities)
        self._header: HeaderParser | None = HeaderParser()
        self._file_key = b""
        self._nonce = bytearray()
        self._opener: StreamOpener | None = None
        self._error: AgeError | None = None
        self._finished = False

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._finished:
            raise AgeError("Decryptor used after finalize()")

    def update(self, data: Bytes) -> bytes:
        self._check()
        out: list[bytes] = []
        try:
            self._feed(data, out)
        except AgeError as exc:
            self._error = exc
            if not out:
                raise
        return b"".join(out)

    def _feed(self, data: Bytes, out: list[bytes]) -> None:
        if self._opener is None:
            if self._header is not None:
                if not self._header.feed(data):
                    return
                self._file_key = _unlock(self._header, self._identities)
                data = self._header.rest
                self._header = None
            view = memoryview(data)
            need = NONCE_SIZE - len(self._nonce)
            self._nonce += view[:need]
            if len(self._nonce) < NONCE_SIZE:
                return
            self._opener = StreamOpener(payload_key(self._file_key, bytes(self._nonce)))
            data = view[need:]
        self._opener.update(data, out)

    def finalize(self) -> bytes:
        self._check()
        self._finished = True
        out: list[bytes] = []
        try:
            if self._header is not None:
                self._header.finish()
            if self._opener is None:
                raise HeaderError("truncated file: the payload nonce is missing")
            self._opener.finalize(out)
        except AgeError as exc:
            self._error = exc
            raise
        return b"".join(out)


def decrypt(identities: Sequence[Identity], ciphertext: Bytes) -> bytes:
    decryptor = Decryptor(identities)
    return decryptor.update(ciphertext) + decryptor.finalize()
