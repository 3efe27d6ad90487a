"""The exceptions raised by backupd.age; every one derives from AgeError."""

from __future__ import annotations


class AgeError(Exception):
    pass


class NoIdentityMatch(AgeError):
    def __init__(self, message: str = "no identity matched any of the recipients") -> None:
        super().__init__(message)


class HeaderError(AgeError):
    pass


class HmacError(AgeError):
    pass


class PayloadError(AgeError):
    pass


class ArmorError(AgeError):
    pass
