"""Keep secrets out of logs, errors and argv echoes.

A URL's user information ends at its last ``@``, so a password holding ``/``,
``:``, ``?`` or ``@`` is found (and hidden) whole. A connection URL is
named in messages by ``describe_url``: scheme, host, port and database only.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

#: A URL token: a scheme, then everything up to white space or a quote.
_URL = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<rest>[^\s'\"]+)", re.I)
_KV_PASSWORD = re.compile(r"(?P<key>\b(?:password|passwd|pwd|secret|token)\s*=\s*)(?P<val>[^\s&;]+)", re.I)
_SECRET_PARAMS = frozenset({"password", "passwd", "pwd", "secret", "token", "sslpassword"})


def _split(rest: str) -> tuple[str | None, str, str]:
    """(user information or None, host and path, ``?query`` or "") of a URL after its ``scheme://``.

    The user information runs to the last ``@``, wherever it is: a password may hold
    ``/``, ``?`` or ``#``, and a query value with an ``@`` must then be written ``%40``.
    """
    userinfo, at, after = rest.rpartition("@")
    cut = min((i for i in (after.find("?"), after.find("#")) if i >= 0), default=len(after))
    return (userinfo if at else None), after[:cut], after[cut:]


def url_password_problem(url: str) -> str | None:
    """Why ``url`` carries a password (user:password@ or a password parameter), or None."""
    match = _URL.match(url.strip())
    if match is None:
        return None
    userinfo, _, query = _split(match["rest"])
    if userinfo is not None and ":" in userinfo:
        return "the URL carries a password (user:password@)"
    for name, _ in parse_qsl(query.lstrip("?"), keep_blank_values=True):
        if name.lower() in _SECRET_PARAMS:
            return f"the URL carries a password ({name}=...)"
    return None


def describe_url(url: str) -> str:
    """``scheme://host:port/database``: what a message may say about a connection URL."""
    match = _URL.match(url.strip())
    if match is None:
        return "(not a URL)"
    _, location, _ = _split(match["rest"])
    return f"{match['scheme']}{location}"


def _redact_url(match: re.Match[str]) -> str:
    userinfo, location, query = _split(match["rest"])
    user = ""
    if userinfo is not None:
        name, colon, _ = userinfo.partition(":")
        user = f"{name}:***@" if colon else f"{name}@"
    if query:
        query = _KV_PASSWORD.sub(lambda m: f"{m['key']}***", query)
    return f"{match['scheme']}{user}{location}{query}"


def redact(text: str) -> str:
    """Replace passwords in URLs (``scheme://user:pw@``, ``?password=``) and ``password=...`` pairs."""
    text = _URL.sub(_redact_url, text)
    return _KV_PASSWORD.sub(lambda m: f"{m['key']}***", text)
