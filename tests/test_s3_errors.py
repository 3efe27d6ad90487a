"""S3-only behaviour: errors at the boundary, write options, aborts, memory, options."""

from __future__ import annotations

import io
import threading
import time
import tracemalloc
from typing import Iterator

import pytest
import urllib3
from botocore.exceptions import ClientError
from botocore.response import StreamingBody
from botocore.stub import Stubber
from pydantic import ValidationError

import s3_server
from backupd.errors import ObjectNotFound, StorageError, StorageUnavailable
from storage.s3 import MiB, S3Options, S3Storage


class SourceFailed(Exception):
    pass


class Generated:
    """``total`` bytes from a generator of 1 MiB blocks, then EOF; optionally raises instead."""

    def __init__(self, total: int, *, fail: BaseException | None = None) -> None:
        self.served = 0
        self._total, self._fail = total, fail
        self._blocks = self._generate()
        self._pending = b""

    def _generate(self) -> Iterator[bytes]:
        block = bytes(range(256)) * 4096  # 1 MiB, allocated once
        while self.served < self._total:
            yield block[: self._total - self.served]

    def read(self, size: int = -1) -> bytes:
        if not self._pending:
            self._pending = next(self._blocks, b"")
            if not self._pending and self._fail is not None:
                raise self._fail
        n = len(self._pending) if size < 0 else size
        chunk, self._pending = self._pending[:n], self._pending[n:]
        self.served += len(chunk)
        return chunk


@pytest.fixture(autouse=True)
def _aws_env() -> Iterator[None]:
    with s3_server.dummy_aws_env():
        yield


def make(endpoint: str, bucket: str, **options: object) -> S3Storage:
    options = {"prefix": "test/", "part_size": 5 * MiB, "max_attempts": 2, **options}
    return S3Storage(S3Options(bucket=bucket, endpoint_url=endpoint, **options))


# ---- errors at the boundary -----------------------------------------------------


def test_unreachable_endpoint() -> None:
    endpoint = f"http://127.0.0.1:{s3_server.free_port()}"
    storage = make(endpoint, "db-backups", max_attempts=2, connect_timeout=1, read_timeout=1)
    started = time.monotonic()
    for call in (lambda: storage.put("k", io.BytesIO(b"x")), lambda: storage.open("k"),
                 lambda: list(storage.list("")), lambda: storage.stat("k"), lambda: storage.delete("k")):
        with pytest.raises(StorageUnavailable) as caught:
            call()
        message = str(caught.value)
        assert message.startswith(f"{endpoint}: cannot connect to endpoint"), message
        assert "\n" not in message and "testing" not in message
        assert caught.value.__cause__ is not None  # chained, never swallowed
    assert time.monotonic() - started < 15


def test_missing_bucket(moto_server: str) -> None:
    storage = make(moto_server, "no-such-bucket-here")
    for call in (lambda: storage.put("k", io.BytesIO(b"x")), lambda: storage.put("k", Generated(11 * MiB)),
                 lambda: storage.open("k"), lambda: list(storage.list("")), lambda: storage.stat("k"),
                 lambda: storage.delete("k")):
        with pytest.raises(StorageUnavailable, match=r"^s3://no-such-bucket-here/test/: bucket does not exist$"):
            call()


def test_no_credentials(moto_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    storage = make(moto_server, s3_bucket)
    with pytest.raises(StorageUnavailable, match="no usable AWS credentials"):
        storage.stat("k")


def test_library_errors_are_converted(s3_storage: S3Storage) -> None:
    with pytest.raises(ObjectNotFound) as caught:
        s3_storage.open("missing")
    assert str(caught.value) == f"{s3_storage.location}missing: no such object"
    assert type(caught.value.__cause__).__name__ == "NoSuchKey"


@pytest.mark.parametrize("code, status, error, message", [
    ("AccessDenied", 403, StorageUnavailable, "{loc}: access denied"),
    ("InvalidAccessKeyId", 403, StorageUnavailable, "{loc}: credentials rejected (InvalidAccessKeyId)"),
    ("SignatureDoesNotMatch", 403, StorageUnavailable, "{loc}: credentials rejected (SignatureDoesNotMatch)"),
    ("SlowDown", 503, StorageUnavailable, "{endpoint}: server unavailable (SlowDown, after 1 attempt)"),
    ("", 502, StorageUnavailable, "{endpoint}: server error (502, after 1 attempt)"),
    ("InvalidArgument", 400, StorageError, "{loc}k: InvalidArgument: bad thing"),
    ("NoSuchKey", 404, ObjectNotFound, "{loc}k: no such object"),
])
def test_error_codes(moto_server: str, s3_bucket: str, code: str, status: int, error: type, message: str) -> None:
    storage = make(moto_server, s3_bucket, max_attempts=1)
    with Stubber(storage._client) as stub:
        stub.add_client_error("get_object", code, "bad thing\nsecond line", status)
        with pytest.raises(StorageError) as caught:
            storage.open("k")
    assert type(caught.value) is error
    assert str(caught.value) == message.format(loc=storage.location, endpoint=moto_server)


def test_read_errors_mid_stream_are_converted(moto_server: str, s3_bucket: str) -> None:
    class Stalls(io.RawIOBase):  # a connection that delivers 10 bytes, then times out
        sent = False

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            if self.sent:
                raise urllib3.exceptions.ReadTimeoutError(None, "/k", "Read timed out.")
            self.sent = True
            return b"0123456789"

    storage = make(moto_server, s3_bucket)
    with Stubber(storage._client) as stub:
        stub.add_response("get_object", {"Body": StreamingBody(Stalls(), 100), "ContentLength": 100})
        reader = storage.open("k")
    assert reader.read(10) == b"0123456789"
    with pytest.raises(StorageUnavailable, match=f"^{moto_server}: timed out waiting for the endpoint$"):
        reader.read(10)
    reader.close()


def test_failed_part_upload_is_aborted(s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    upload_part = s3_storage._client.upload_part

    def flaky(**kwargs: object) -> object:
        if kwargs["PartNumber"] == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "We encountered an internal error"},
                               "ResponseMetadata": {"HTTPStatusCode": 500}}, "UploadPart")
        return upload_part(**kwargs)

    monkeypatch.setattr(s3_storage._client, "upload_part", flaky)
    with pytest.raises(StorageUnavailable, match="server unavailable"):
        s3_storage.put("big", Generated(20 * MiB))
    assert s3_server.dangling_uploads(s3_storage.endpoint, s3_storage.bucket) == []
    assert list(s3_storage.list("")) == []


# ---- what reaches the server ------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 12 * MiB])
def test_sse_and_storage_class_reach_the_object(moto_server: str, s3_bucket: str, size: int) -> None:
    storage = make(moto_server, s3_bucket, sse="AES256", storage_class="STANDARD_IA")
    storage.put("enc", Generated(size))
    head = s3_server.client(moto_server).head_object(Bucket=s3_bucket, Key="test/enc")
    assert head["ServerSideEncryption"] == "AES256"
    assert head["StorageClass"] == "STANDARD_IA"
    assert head["ContentLength"] == size
    assert head["ETag"].endswith('-3"') == (size > 5 * MiB)  # multipart: 3 parts


def test_prefix_isolates_keys(moto_server: str, s3_bucket: str) -> None:
    s3_server.client(moto_server).put_object(Bucket=s3_bucket, Key="other/x", Body=b"not ours")
    s3_server.client(moto_server).put_object(Bucket=s3_bucket, Key="test/dir/", Body=b"")  # console folder
    storage = make(moto_server, s3_bucket, prefix="/test")
    assert storage.location == f"s3://{s3_bucket}/test/"
    storage.put("dir/mine", io.BytesIO(b"ours"))
    assert [o.key for o in storage.list("")] == ["dir/mine"]
    keys = [o["Key"] for o in s3_server.client(moto_server).list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["other/x", "test/dir/", "test/dir/mine"]


# ---- aborted uploads --------------------------------------------------------------


@pytest.mark.parametrize("fail", [SourceFailed("boom"), KeyboardInterrupt()])
def test_failed_multipart_is_aborted(s3_storage: S3Storage, fail: BaseException) -> None:
    source = Generated(2 * 5 * MiB + 100, fail=fail)  # two full parts, a partial third, then the error
    with pytest.raises(type(fail)):
        s3_storage.put("big", source)
    assert source.served == 2 * 5 * MiB + 100
    assert s3_server.dangling_uploads(s3_storage.endpoint, s3_storage.bucket) == []
    with pytest.raises(ObjectNotFound):
        s3_storage.stat("big")


# ---- bounded memory ---------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto server in another process, so this process's memory is the client's alone."""
    with s3_server.moto_process(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint


def test_memory_is_bounded(moto_elsewhere: str) -> None:
    part, concurrency, total = 5 * MiB, 2, 200 * MiB
    bucket = s3_server.create_bucket(moto_elsewhere)
    storage = make(moto_elsewhere, bucket, part_size=part, max_concurrency=concurrency)
    source = Generated(total)
    tracemalloc.start()
    try:
        info = storage.put("huge", source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.size == total == storage.stat("huge").size
    assert peak < (concurrency + 2) * part, f"peak {peak / MiB:.1f} MiB"


def test_parts_in_flight_are_bounded(moto_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = make(moto_server, s3_bucket, max_concurrency=3)
    upload_part, lock = storage._client.upload_part, threading.Lock()
    in_flight, most = 0, 0

    def counted(**kwargs: object) -> object:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            time.sleep(0.05)
            return upload_part(**kwargs)
        finally:
            with lock:
                in_flight -= 1

    monkeypatch.setattr(storage._client, "upload_part", counted)
    assert storage.put("big", Generated(8 * 5 * MiB)).size == 40 * MiB
    assert most == 3


# ---- options -----------------------------------------------------------------------


@pytest.mark.parametrize("bucket", ["ab", "Bad_Bucket", "UPPER", "a..b", "-abc", "abc-", "192.168.1.1", "x" * 64])
def test_bad_bucket_names(bucket: str) -> None:
    with pytest.raises(ValidationError, match="bucket"):
        S3Options(bucket=bucket)


def test_good_bucket_names() -> None:
    for bucket in ("abc", "db-backups", "my.bucket.1", "x" * 63):
        assert S3Options(bucket=bucket).bucket == bucket


def test_kms_key_needs_kms() -> None:
    with pytest.raises(ValidationError, match="sse_kms_key_id"):
        S3Options(bucket="abc", sse_kms_key_id="key-1")
    with pytest.raises(ValidationError, match="sse_kms_key_id"):
        S3Options(bucket="abc", sse="AES256", sse_kms_key_id="key-1")
    assert S3Options(bucket="abc", sse="aws:kms", sse_kms_key_id="key-1").sse_kms_key_id == "key-1"


@pytest.mark.parametrize("value, expected", [(16 * MiB, 16 * MiB), ("16MiB", 16 * MiB), ("8M", 8 * MiB),
                                             ("5 MB", 5 * MiB), ("1g", 1 << 30), ("6291456", 6 * MiB)])
def test_part_size(value: object, expected: int) -> None:
    assert S3Options(bucket="abc", part_size=value).part_size == expected


@pytest.mark.parametrize("value", [4 * MiB, "4MiB", 5 * MiB - 1, "6GiB", "lots", "-5M"])
def test_bad_part_size(value: object) -> None:
    with pytest.raises(ValidationError, match="part_size"):
        S3Options(bucket="abc", part_size=value)


@pytest.mark.parametrize("value, expected", [("", ""), ("/", ""), ("prod", "prod/"), ("/prod/db", "prod/db/"),
                                             ("prod/", "prod/")])
def test_prefix_normalized(value: str, expected: str) -> None:
    assert S3Options(bucket="abc", prefix=value).prefix == expected


@pytest.mark.parametrize("options", [
    {"prefix": "a/../b"}, {"prefix": "a//b"}, {"endpoint_url": "ftp://host"},
    {"endpoint_url": "https://key:secret@host"}, {"access_key_id": "AKIA..."}, {"sse": "aws:kms:dsse"},
    {"addressing_style": "dns"}, {"max_attempts": 0}, {"max_concurrency": 0},
])
def test_bad_options(options: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        S3Options(bucket="abc", **options)


def test_defaults() -> None:
    o = S3Options(bucket="abc")
    assert (o.type, o.part_size, o.max_concurrency, o.max_attempts, o.addressing_style) == ("s3", 16 * MiB, 4, 8, "auto")



def test_list_follows_pages(s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    real, pages = s3_storage._client.get_paginator, []

    def small_pages(name: str) -> object:  # S3 pages hold 1000 keys; make them hold 2
        paginator = real(name)
        paginate = paginator.paginate

        def counted(**kwargs: object) -> Iterator[dict]:
            for page in paginate(**kwargs, PaginationConfig={"PageSize": 2}):
                pages.append(page)
                yield page

        paginator.paginate = counted
        return paginator

    monkeypatch.setattr(s3_storage._client, "get_paginator", small_pages)
    keys = [f"wal/{i:08X}" for i in range(5)]
    for key in reversed(keys):
        s3_storage.put(key, io.BytesIO(b""))
    assert [o.key for o in s3_storage.list("wal/")] == keys
    assert len(pages) == 3
