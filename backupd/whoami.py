"""Who runs this command, as the audit trail names them: the user, and the one behind sudo."""

from __future__ import annotations

import os
import pwd


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def current_user() -> str:
    name = user_name(os.geteuid())
    sudo = os.environ.get("SUDO_USER")
    return f"{sudo} (as {name})" if sudo and sudo != name else name
