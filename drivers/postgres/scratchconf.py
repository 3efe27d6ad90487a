"""The configuration a restored data directory starts with in verification and the PITR drill: backupd's own.

The backup's ``postgresql.conf``, ``postgresql.auto.conf``, ``pg_hba.conf`` and
``pg_ident.conf`` (and whatever they include) are content like any other: a
``recovery_end_command``, ``archive_cleanup_command``, ``shared_preload_libraries``
or ``ssl_passphrase_command`` there would run at start. They are removed from the
scratch copy and the server starts with ``-c config_file=`` naming a file backupd
writes. The few settings recovery must match on the primary come from
``pg_control`` (read by ``pg_controldata`` in the sandbox), bounded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from backupd import tool
from backupd.errors import DriverError, IntegrityError
from backupd.sandbox import Sandbox, chown_to
from drivers.postgres.cluster import Cluster, conf_lines

#: pg_controldata's line -> (setting, the most a scratch server accepts)
CONTROL = {
    "max_connections setting": ("max_connections", 10000),
    "max_worker_processes setting": ("max_worker_processes", 1024),
    "max_wal_senders setting": ("max_wal_senders", 1024),
    "max_prepared_xacts setting": ("max_prepared_transactions", 10000),
    "max_locks_per_xact setting": ("max_locks_per_transaction", 10000),
}
#: lock table slots (max_locks_per_transaction x (max_connections + max_prepared_transactions)): about 1 GiB
MAX_LOCK_SLOTS = 4_000_000
BACKUP_CONFIG = ("postgresql.conf", "postgresql.auto.conf", "pg_hba.conf", "pg_ident.conf")
HBA = "local all all trust\n"


def control_settings(pg_controldata: str, data: Path, sandbox: Sandbox) -> dict[str, int]:
    """The primary's settings recorded in pg_control; IntegrityError when unreadable or out of bounds."""
    try:
        out = tool.run([pg_controldata, "-D", str(data)], sandbox=sandbox, env={"LC_ALL": "C"}, timeout=60)
    except DriverError as exc:
        raise IntegrityError(f"the restored control file cannot be read: {exc}") from None
    found: dict[str, int] = {}
    for line in out.splitlines():
        label, _, value = line.partition(":")
        if label.strip() in CONTROL:
            name, limit = CONTROL[label.strip()]
            try:
                number = int(value.strip())
            except ValueError:
                raise IntegrityError(f"pg_control: {name} is not a number: {value.strip()[:40]!r}") from None
            if not 0 <= number <= limit:
                raise IntegrityError(f"pg_control: {name} = {number} is beyond what a scratch server accepts ({limit})")
            found[name] = number
    missing = [name for name, _ in CONTROL.values() if name not in found]
    if missing:
        raise IntegrityError(f"pg_controldata reported no {', '.join(missing)}")
    slots = found["max_locks_per_transaction"] * (found["max_connections"] + found["max_prepared_transactions"])
    if slots > MAX_LOCK_SLOTS:
        raise IntegrityError(f"pg_control: the lock table ({slots} slots) is beyond what a scratch server accepts "
                             f"({MAX_LOCK_SLOTS})")
    return found


def write_own_config(cluster: Cluster, settings: dict[str, Any]) -> Path:
    """Replace the backup's configuration in ``cluster.data`` with backupd's own; return the config file."""
    conf = cluster.root / "conf"
    conf.mkdir(mode=0o700, exist_ok=True)
    for name in BACKUP_CONFIG:
        (cluster.data / name).unlink(missing_ok=True)
    (cluster.data / "postgresql.auto.conf").write_text("# written by backupd: the backup's settings are not used\n")
    hba, ident = conf / "pg_hba.conf", conf / "pg_ident.conf"
    hba.write_text(HBA)
    ident.write_text("")
    main = conf / "postgresql.conf"
    base = {**cluster.base_settings(), "listen_addresses": "", "hba_file": str(hba), "ident_file": str(ident),
            "shared_preload_libraries": "", "ssl": False, "archive_mode": False, "archive_command": "",
            "archive_cleanup_command": "", "recovery_end_command": "", "shared_buffers": "128MB",
            "lc_messages": "C", "fsync": False, "hot_standby": True}
    main.write_text("# written by backupd for a scratch server\n" + conf_lines({**base, **settings}))
    for path in (main, hba, ident, cluster.data / "postgresql.auto.conf"):
        os.chmod(path, 0o600)
    chown_to(conf, cluster.user)
    chown_to(cluster.data / "postgresql.auto.conf", cluster.user)
    cluster.options = ["-c", f"config_file={main}"]
    return main
