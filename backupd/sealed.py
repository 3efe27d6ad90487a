"""Text that may come from restored content, kept in the repository only encrypted.

Verify reports, the ``last-failure`` record and audit events name tables, checks
and error messages; any of those can be chosen by whoever wrote the backed-up
data (a table name is data). In the repository such fields live under one
``sealed`` member: an ASCII-armored age file encrypted to the job's recipients,
exactly like the streams (``age -d -i key.txt`` reads it with no backupd). What
the daemon and metrics need (result, timestamps, backup id, counts) stays in
the clear beside it.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from backupd import age

SEALED = "sealed"
#: How big a sealed member may be when read back (reports of a few thousand tables fit easily).
MAX_SEALED = 16 << 20


def seal(data: dict[str, Any], recipients: Sequence[Any]) -> str:
    """``data`` as JSON, age-encrypted to ``recipients``, armored."""
    plaintext = json.dumps(data, sort_keys=True).encode()
    return age.armor(age.encrypt(recipients, plaintext)).decode()


def seal_fields(document: dict[str, Any], fields: Sequence[str], recipients: Sequence[Any]) -> dict[str, Any]:
    """A copy of ``document`` with ``fields`` moved into its sealed member (absent fields are skipped)."""
    hidden = {name: document[name] for name in fields if name in document}
    public = {name: value for name, value in document.items() if name not in hidden}
    if hidden:
        public[SEALED] = seal(hidden, recipients)
    return public


def unseal(document: dict[str, Any], identities: Sequence[Any]) -> dict[str, Any]:
    """The document with its sealed fields merged back; unchanged without identities or a sealed member.

    Raises ``age.AgeError`` (or ValueError) when the member cannot be decrypted or is not JSON.
    """
    text = document.get(SEALED)
    if not identities or not isinstance(text, str):
        return document
    if len(text) > MAX_SEALED:
        raise ValueError(f"sealed member of {len(text)} bytes exceeds {MAX_SEALED}")
    hidden = json.loads(age.decrypt(identities, age.dearmor(text.encode())))
    if not isinstance(hidden, dict):
        raise ValueError("sealed member is not a JSON object")
    opened = {name: value for name, value in document.items() if name != SEALED}
    opened.update(hidden)
    return opened
