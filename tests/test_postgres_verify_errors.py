"""Verification's verdicts on pg_restore's end: the content rejected is a failed verification (IntegrityError,
exit 3); a pg_restore killed (a cancelled run) or one that cannot start is "could not run" (DriverError, exit 1)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from backupd.errors import DriverError, IntegrityError
from backupd.sandbox import Sandbox
from drivers.postgres import logical


class Source:
    def open(self, name: str) -> io.BytesIO:
        assert name == logical.DUMP
        return io.BytesIO(b"PGDMP" + b"\0" * 300_000)


def fake_pg_restore(tmp_path: Path, body: str) -> str:
    path = tmp_path / "pg_restore"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    return Sandbox((tmp_path,), None, enabled=False)


def test_content_rejected_is_integrity_error(tmp_path: Path, sandbox: Sandbox) -> None:
    tool = fake_pg_restore(tmp_path, "cat >/dev/null; echo 'pg_restore: error: could not execute query: "
                                     "ERROR:  permission denied' >&2; exit 1")
    with pytest.raises(IntegrityError, match="the dump does not restore: pg_restore exited with status 1: .*"
                                             "permission denied"):
        logical.restore_into_scratch(tool, Source(), "dbname=x", sandbox)


def test_killed_pg_restore_is_not_a_verdict(tmp_path: Path, sandbox: Sandbox) -> None:
    tool = fake_pg_restore(tmp_path, "head -c 1000 >/dev/null; kill -9 $$")
    with pytest.raises(DriverError, match="pg_restore was killed by signal SIGKILL") as caught:
        logical.restore_into_scratch(tool, Source(), "dbname=x", sandbox)
    assert not isinstance(caught.value, IntegrityError)


def test_missing_pg_restore_is_not_a_verdict(tmp_path: Path, sandbox: Sandbox) -> None:
    with pytest.raises(DriverError, match="cannot start") as caught:
        logical.restore_into_scratch(str(tmp_path / "nowhere" / "pg_restore"), Source(), "dbname=x", sandbox)
    assert not isinstance(caught.value, IntegrityError)
