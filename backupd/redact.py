"""Keep secrets out of logs, errors and argv echoes."""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@", re.I)
_KV_PASSWORD = re.compile(r"(?P<key>\b(?:password|passwd|pwd|secret|token)\s*=\s*)(?P<val>[^\s&;]+)", re.I)


def redact(text: str) -> str:
    """Replace passwords in URLs (``scheme://user:pw@``) and ``password=...`` pairs."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _KV_PASSWORD.sub(lambda m: f"{m['key']}***", text)
