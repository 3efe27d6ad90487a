"""A logical backup's start-up: what `backupd backup JOB` imports before its driver runs.

bench/postgres.py times `backupd backup` (no daemon) against `pg_dump -Fc`, so the command's
own start-up is part of its time. These tests guard what loads, not how long it takes.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict
from pydantic import ValidationError

from backupd import age
from drivers.postgres.options import PLAIN_DSN, PostgresOptions
from support import write_config

#: Modules a logical PostgreSQL backup to a filesystem repository never uses.
NEVER = ("boto3", "botocore", "storage.s3", "prometheus_client", "backupd.metrics", "apscheduler", "backupd.daemon",
         "drivers.postgres.checks", "drivers.postgres.engine", "drivers.postgres.filerestore",
         "drivers.postgres.physical", "drivers.postgres.pitr", "drivers.postgres.recovery", "drivers.postgres.verify",
         "drivers.postgres.walarchive", "drivers.postgres.walfetch", "backupd.restore_to")

PROBE = """
import sys
from backupd.cli.main import build_parser
from backupd.cli.common import settings_from
from backupd.context import JobContext

def loaded(names):
    return sorted(name for name in names if name in sys.modules)

never = sys.argv[1].split(",")
args = build_parser("backup").parse_args(["--config", sys.argv[2], "backup", "pg"])
settings = settings_from(args)
ctx = JobContext(settings, "pg")
ctx.repository, ctx.recipients
print("settings:", loaded(["psycopg", *never]))
driver = ctx.driver
print("driver:", type(driver).__name__, loaded(never), "psycopg" in sys.modules)
"""


def test_a_logical_backup_loads_only_what_it_uses(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [age.X25519Identity.generate().to_recipient()]},
        "jobs.pg": {"driver": "postgres", "storage": "main", "method": "logical",
                    "dsn": "postgresql://backup@db.example:5432/orders?sslmode=require&connect_timeout=10"},
    })
    out = subprocess.run([sys.executable, "-c", PROBE, ",".join(NEVER), str(config)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["settings: []", "driver: PostgresDriver [] True"]  # psycopg: the driver's own connection


PLAIN = ["postgresql://h/db", "postgres://u@h:5432/db", "postgresql://", "postgresql:///db", "postgresql://h",
         "postgresql://[::1]:5432/db", "postgresql://h1:5432,h2:5433/db?target_session_attrs=read-write",
         "postgresql://u@h/db?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem&application_name=backupd",
         "postgresql://:5432/db", "postgresql://h/db?host=/var/run/postgresql"]
NOT_PLAIN = ["postgresql://u:pw@h/db", "postgresql://h/db?password=x", "postgresql://h/db?bogus=1",
             "postgresql://h/db?sslmode", "postgresql://h/db?sslmode=a=b", "postgresql://h/d%zz",
             "postgresql://h/d%41", "postgresql://h/db?ssl=true", "postgresql://[::1/db", "postgresql://h/db?",
             "postgresql://h/db#x", "postgresql://u%40x@h/db", "postgresql://h/db?options=-c%20x=1"]


def libpq_accepts(dsn: str) -> bool:
    try:
        return not conninfo_to_dict(dsn).get("password")
    except Exception:
        return False


@pytest.mark.parametrize("dsn", PLAIN + NOT_PLAIN)
def test_a_dsn_is_accepted_exactly_when_libpq_parses_it_without_a_password(dsn: str) -> None:
    assert (dsn in PLAIN) == bool(PLAIN_DSN.fullmatch(dsn))
    try:
        PostgresOptions(dsn=dsn)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == libpq_accepts(dsn)


def test_every_dsn_checked_without_libpq_is_one_libpq_accepts() -> None:
    """Random URLs of the pieces that matter to libpq's parser: none the fast check passes is one libpq refuses."""
    rng = random.Random(15)
    pieces = ["h", "db", "u", "@", ":", "5432", "/", "?", "&", "=", ",", "[", "]", "::1", "%", "%20", "#", "sslmode",
              "host", "password", "bogus", "require", "-", ".", "~", "_", " ", "'", "\\"]
    passed = 0
    for _ in range(5000):
        dsn = "postgresql://" + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 9)))
        if PLAIN_DSN.fullmatch(dsn):
            passed += 1
            assert libpq_accepts(dsn), dsn
    assert passed > 100
