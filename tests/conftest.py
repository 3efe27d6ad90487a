from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

import s3_server  # storage fixtures
from backupd.storage import Storage
from storage.filesystem import FilesystemStorage
from storage.s3 import MiB, S3Options, S3Storage

@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    """``main()`` sets umask 077 for its process; a test that calls it in-process gets the runner's back."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield
    os.umask(saved)


# ---- storage fixtures: filesystem and S3 (moto) backends ------------------------
# `storage` runs a test once per backend (the contract suite); `s3_storage` and
# `fs_storage` give one backend directly. The S3 server is moto on 127.0.0.1.


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server shared by the session (dummy AWS env set)."""
    with s3_server.moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(moto_server: str) -> str:
    """A fresh, empty bucket on the moto server."""
    return s3_server.create_bucket(moto_server)


@pytest.fixture
def s3_storage(moto_server: str, s3_bucket: str) -> Iterator[S3Storage]:
    """S3Storage under prefix "test/", with 5 MiB parts so multipart is exercised."""
    options = S3Options(bucket=s3_bucket, prefix="test/", endpoint_url=moto_server,
                        region="us-east-1", part_size=5 * MiB, max_attempts=2)
    with S3Storage(options) as storage:
        yield storage


@pytest.fixture
def fs_storage(tmp_path: Path) -> Iterator[FilesystemStorage]:
    with FilesystemStorage(tmp_path / "repo") as storage:
        yield storage


_STORAGE_FIXTURES = {"filesystem": "fs_storage", "s3": "s3_storage"}


@pytest.fixture(params=list(_STORAGE_FIXTURES))
def storage(request: pytest.FixtureRequest) -> Storage:
    """Each storage backend in turn."""
    return request.getfixturevalue(_STORAGE_FIXTURES[request.param])

# ---- end of storage fixtures ------------------------------------------------------

pytest_plugins = ["core_fixtures"]
