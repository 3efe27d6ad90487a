"""The scale bench's repository builders (``bench/scale.py``) for tests: N backups and M WAL objects written
straight to the filesystem or to moto S3, and the storage table a job's configuration names them by."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("scale", Path(__file__).resolve().parents[1] / "bench" / "scale.py")
assert _spec is not None and _spec.loader is not None
scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale)


def scale_storage(kind: str, work: Path, request: pytest.FixtureRequest, bucket: str, backups: int, wal: int,
                  **build: bool) -> dict[str, object]:
    """A built repository's storage table: ``work/repo`` on the filesystem, or ``bucket`` on moto S3."""
    if kind == "s3":
        endpoint = request.getfixturevalue("moto_server")
        scale.build_s3(endpoint, bucket, backups, wal, **build)
        return {"type": "s3", "bucket": bucket, "prefix": "prod/", "endpoint_url": endpoint}
    scale.build_fs(work / "repo", backups, wal, **build)
    return {"type": "filesystem", "path": str(work / "repo")}
