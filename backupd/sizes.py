"""Sizes in the configuration: ``"16MiB"``, ``"8M"``, ``"5 GB"``, or bytes."""

from __future__ import annotations

import re

MiB = 1 << 20
GiB = 1 << 30

_SIZE = re.compile(r"\s*(\d+)\s*(?:([kmgt])(?:i?b)?|b)?\s*", re.IGNORECASE)
_UNITS = {None: 1, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}


def parse_size(value: object) -> object:
    """``"16MiB"``, ``"8M"``, ``"5 GB"`` -> bytes. Units are binary, as in the AWS CLI.

    A pydantic ``BeforeValidator``: anything but a string passes through for the field's own type check.
    """
    if not isinstance(value, str):
        return value
    match = _SIZE.fullmatch(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (use bytes or e.g. '16MiB')")
    return int(match[1]) * _UNITS[match[2] and match[2].lower()]
