"""The typed driver contract: capabilities found by isinstance, and metadata.pitr read and written through PitrStart."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from backupd import plugins
from backupd.driver import BackupResult, PitrDrill, WalArchiving
from backupd.manifest import Manifest, PitrStart
from backupd.timeutil import parse_timestamp, utcnow


def _manifest(metadata: dict) -> Manifest:
    return Manifest("20261124T020000Z", "job", "test", "physical", utcnow(), utcnow(), [], {}, {}, metadata=metadata)


def test_capabilities_are_types_the_drivers_declare() -> None:
    postgres, mysql, sqlite = (plugins.driver_class(name) for name in ("postgres", "mysql", "sqlite"))
    assert issubclass(postgres, WalArchiving) and issubclass(postgres, PitrDrill)
    assert issubclass(mysql, PitrDrill) and not issubclass(mysql, WalArchiving)
    assert not issubclass(sqlite, WalArchiving) and not issubclass(sqlite, PitrDrill)


def test_pitr_start_is_written_as_the_repository_format_has_it() -> None:
    start = PitrStart("wal", "00000001/000000010000000000000002", dt.datetime(2026, 11, 24, 2, 0, 5, 120, dt.UTC))
    result = BackupResult(metadata={"timeline": 1}, pitr=start)
    text = json.dumps(result.manifest_metadata())
    assert text == ('{"timeline": 1, "pitr": {"log_kind": "wal", "first_log": "00000001/000000010000000000000002", '
                    '"from": "2026-11-24T02:00:05.000120Z"}}')
    assert PitrStart.from_manifest(_manifest(json.loads(text))) == start
    assert BackupResult(metadata={"timeline": 1}).manifest_metadata() == {"timeline": 1}


def test_pitr_start_absent_or_unreadable() -> None:
    assert PitrStart.read(_manifest({})) is None
    assert not PitrStart.recorded(_manifest({}))
    for pitr, why in (("x", "not an object"), ({"log_kind": "wal"}, "no 'from'"),
                      ({"from": "yesterday"}, "RFC 3339"), ({"from": "2026-11-24T02:00:00Z", "first_log": 7}, "first_log")):
        with pytest.raises(ValueError, match=why):
            PitrStart.read(_manifest({"pitr": pitr}))
        assert PitrStart.from_manifest(_manifest({"pitr": pitr})) is None
    lenient = PitrStart.read(_manifest({"pitr": {"from": "2026-11-24T02:00:00Z", "log_kind": "binlog"}}))
    assert lenient == PitrStart("binlog", "", parse_timestamp("2026-11-24T02:00:00Z"))
