"""ASCII armor: strict PEM (RFC 7468) with the label "AGE ENCRYPTED FILE".

Only whitespace is accepted around the block; LF or CRLF line endings; every
line but the last holds exactly 64 columns of canonical, padded base64."""

from __future__ import annotations

import base64
import binascii

from backupd.age.errors import ArmorError

BEGIN = b"-----BEGIN AGE ENCRYPTED FILE-----"
END = b"-----END AGE ENCRYPTED FILE-----"
COLUMNS = 64

Bytes = bytes | bytearray | memoryview


def armor(data: Bytes) -> bytes:
    encoded = base64.b64encode(data)
    lines = [encoded[i : i + COLUMNS] for i in range(0, len(encoded), COLUMNS)]
    return b"\n".join([BEGIN, *lines, END]) + b"\n"


def is_armored(data: Bytes) -> bool:
    return bytes(data[: len(BEGIN) + 1024]).lstrip().startswith(BEGIN)


def dearmor(data: Bytes) -> bytes:
    lines = bytes(data).split(b"\n")
    index = 0
    while index < len(lines) and not lines[index].strip():
        index += 1
    if index == len(lines) or lines[index].removesuffix(b"\r") != BEGIN:
        raise ArmorError("armored data must start with " + BEGIN.decode())
    body: list[bytes] = []
    for end in range(index + 1, len(lines)):
        line = lines[end].removesuffix(b"\r")
        if line == END:
            break
        body.append(line)
    else:
        raise ArmorError("armored data has no " + END.decode() + " line")
    if any(line.strip() for line in lines[end + 1 :]):
        raise ArmorError("unexpected data after the end of the armored block")
    if body and not (all(len(line) == COLUMNS for line in body[:-1]) and 0 < len(body[-1]) <= COLUMNS):
        raise ArmorError(f"armored lines must be {COLUMNS} columns, except a shorter last line")
    encoded = b"".join(body)
    try:
        decoded = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise ArmorError(f"invalid base64 in armored data: {exc}") from exc
    if base64.b64encode(decoded) != encoded:
        raise ArmorError("non-canonical base64 in armored data")
    return decoded
