"""S3 storage: AWS or any S3-compatible endpoint (MinIO, Ceph, ...).

A source is read ``part_size`` bytes at a time. An object that fits in one part
is a single PUT; a larger one is a multipart upload with at most
``max_concurrency`` parts in flight, so memory stays near
``(max_concurrency + 1) * part_size``. A failed multipart upload is aborted on
the server before the error propagates; if even the abort fails, a bucket
lifecycle rule (AbortIncompleteMultipartUpload) is the safety net.

Credentials come from the standard AWS chain only (environment, shared files,
instance profile); throttling and 5xx responses are retried by botocore.

Object Lock. With ``object_lock`` set, every put of backup data (one given
``retain_until``) carries that mode and a retain-until date of
max(``retain_until``, now + ``object_lock_min_days``). On a bucket with Object
Lock enabled (configured here, or found on the bucket), ``delete`` removes the
key's versions by VersionId, oldest first: a plain DeleteObject would only add
a delete marker and leave the locked bytes billed. A version still under
retention (or legal hold) raises ``ObjectLocked`` with its date, the key
unchanged.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import io
import itertools
import re
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Annotated, Any, BinaryIO, Iterator, Literal, Mapping
from urllib.parse import urlsplit

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, CredentialRetrievalError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import (EndpointConnectionError, HTTPClientError, NoCredentialsError,
                                 PartialCredentialsError, ReadTimeoutError)
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from backupd.errors import ObjectChanged, ObjectExists, ObjectLocked, ObjectNotFound, StorageError, StorageUnavailable
from backupd.sizes import GiB, MiB, parse_size
from backupd.storage import (LOCKED_INDEFINITELY, Metadata, ObjectInfo, Readable, Storage, Versioned, check_key,
                             resolve_metadata)
from backupd.timeutil import format_timestamp

log = structlog.get_logger(__name__)

MAX_PARTS = 10_000  # S3's limit per multipart upload
READ_BUFFER = 1 * MiB  # for open()
BODY_READ = 256 << 10  # largest read of a part's body

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

_PART_CHECKSUMS = {"ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1", "ChecksumSHA256"}
_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
_DENIED = {"AccessDenied", "403", "Forbidden"}
# S3 error code -> what it means here; {where} is the object, {loc} the bucket and prefix.
_CLIENT_ERRORS = [
    (_NOT_FOUND, ObjectNotFound, "{where}: no such object"),
    ({"NoSuchBucket"}, StorageUnavailable, "{loc}: bucket does not exist"),
    ({"PreconditionFailed", "412"}, ObjectExists, "{where}: already exists"),
    ({"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"},
     StorageUnavailable, "{loc}: access denied"),
    ({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
      "RequestTimeTooSkewed"}, StorageUnavailable, "{loc}: credentials rejected ({code})"),
    ({"PermanentRedirect", "AuthorizationHeaderMalformed", "301", "IllegalLocationConstraintException"},
     StorageUnavailable, "{loc}: wrong region for this bucket ({code})"),
    ({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"},
     StorageUnavailable, "{endpoint}: server unavailable ({code}, {tries})"),
]


class S3Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = "s3"
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    part_size: Annotated[int, BeforeValidator(parse_size), Field(ge=5 * MiB, le=5 * GiB)] = 16 * MiB
    max_concurrency: int = Field(4, ge=1, le=64)
    storage_class: str | None = None
    sse: Literal["AES256", "aws:kms"] | None = None
    sse_kms_key_id: str | None = None
    max_attempts: int = Field(8, ge=1, description="total attempts per request, the first included")
    connect_timeout: float = Field(10, gt=0)
    read_timeout: float = Field(60, gt=0)
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    object_lock: Literal["governance", "compliance"] | None = Field(
        None, description="lock backup data with this Object Lock mode (the bucket must have Object Lock enabled)")
    object_lock_min_days: int = Field(
        0, ge=0, le=36500, description="lock backup data at least this long, whatever the retention policy keeps")

    @field_validator("object_lock", mode="before")
    @classmethod
    def _lock_mode(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not _BUCKET.fullmatch(value) or ".." in value:
            raise ValueError("a bucket name is 3-63 lowercase letters, digits, '.' and '-', "
                             "starting and ending with a letter or digit")
        if re.fullmatch(r"[\d.]+", value) and value.count(".") == 3:
            raise ValueError("a bucket name must not look like an IP address")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.lstrip("/")
        if not value:
            return ""
        value = value if value.endswith("/") else value + "/"
        if any(part in ("", ".", "..") for part in value[:-1].split("/")):
            raise ValueError("must be '/'-separated names, without '.', '..' or empty components")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("must be an http:// or https:// URL")
        if url.username or url.password:
            raise ValueError("must not carry credentials: use the AWS credential chain")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _kms_key(self) -> "S3Options":
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise ValueError('sse_kms_key_id needs sse = "aws:kms"')
        if self.object_lock_min_days and self.object_lock is None:
            raise ValueError('object_lock_min_days needs object_lock = "governance" or "compliance"')
        return self


class _Part:
    """One part's bytes, filled from the source and read back by botocore.

    A file-like body lets botocore checksum, sign, send and (on retry) resend
    the part without ever making a second whole copy of it.
    """

    def __init__(self, source: Readable, size: int) -> None:
        data: bytes | bytearray = _read(source, size)
        if data and len(data) < size and (more := _read(source, size - len(data))):
            # A source of short reads: fill one buffer in place (never pieces plus a joined copy).
            buf, got = bytearray(size), len(data)
            with memoryview(buf) as view:
                view[:got] = data
                while more:
                    view[got:got + len(more)] = more
                    got += len(more)
                    more = _read(source, size - got) if got < size else b""
            del buf[got:]
            data = buf
        self.length = len(data)
        self._view = memoryview(data)
        self._pos = 0

    def __len__(self) -> int:
        return self.length

    def read(self, size: int | None = -1) -> bytes:
        # Short reads are allowed, and keep botocore's scratch small: it checksums,
        # signs and sends a body by reading it in 1 MiB chunks.
        end = self.length if size is None or size < 0 else min(self.length, self._pos + min(size, BODY_READ))
        data = bytes(self._view[self._pos:end])
        self._pos = max(self._pos, end)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def release(self) -> None:
        self._view.release()
        self._view, self.length = memoryview(b""), 0


class _Body(io.RawIOBase):
    """A get_object body as a raw stream; read errors become storage errors."""

    def __init__(self, body: Any, errors: Any) -> None:
        self._body, self._errors = body, errors

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        with self._errors():
            data = self._body.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3Storage(Storage):
    deferred_metadata = True
    options_model = S3Options

    def __init__(self, options: S3Options | dict[str, Any]) -> None:
        self.options = o = S3Options.model_validate(options)
        self.bucket, self.prefix = o.bucket, o.prefix
        self.location = f"s3://{o.bucket}/{o.prefix}"
        config = Config(retries={"total_max_attempts": o.max_attempts, "mode": "standard"},
                        connect_timeout=o.connect_timeout, read_timeout=o.read_timeout,
                        s3={"addressing_style": o.addressing_style}, tcp_keepalive=True,
                        max_pool_connections=max(10, o.max_concurrency + 2))
        self.endpoint = o.endpoint_url or "S3"
        with self._errors():
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=o.endpoint_url, region_name=o.region, config=config)
        self.endpoint = self._client.meta.endpoint_url
        # Whether deletes must remove versions: known when we lock, else asked of the bucket once.
        self._bucket_locked: bool | None = True if o.object_lock else None
        self._warned_no_lock = False

    # -- the boundary: every botocore exception is converted here ------------

    @contextlib.contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        where = self.location + (key or "")
        tries = f"after {self.options.max_attempts} attempt" + "s" * (self.options.max_attempts > 1)
        try:
            yield
        except StorageError:
            raise
        except ClientError as exc:
            raise self._client_error(exc, where, tries) from exc
        except ConnectTimeoutError as exc:
            raise StorageUnavailable(f"{self.endpoint}: timed out connecting to endpoint ({tries})") from exc
        except ReadTimeoutError as exc:
            raise StorageUnavailable(f"{self.endpoint}: timed out waiting for the endpoint") from exc
        except EndpointConnectionError as exc:
            raise StorageUnavailable(f"{self.endpoint}: cannot connect to endpoint ({tries})") from exc
        except (BotoConnectionError, HTTPClientError) as exc:
            raise StorageUnavailable(f"{self.endpoint}: connection failed: {type(exc).__name__}") from exc
        except (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError) as exc:
            raise StorageUnavailable(f"{self.location}: no usable AWS credentials "
                                     "(environment, shared files or instance profile)") from exc
        except BotoCoreError as exc:
            raise StorageError(f"{where}: {exc}") from exc

    def _client_error(self, exc: ClientError, where: str, tries: str) -> StorageError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        for codes, cls, message in _CLIENT_ERRORS:
            if code in codes:
                return cls(message.format(where=where, loc=self.location, endpoint=self.endpoint,
                                          code=code, tries=tries))
        if status >= 500:
            return StorageUnavailable(f"{self.endpoint}: server error ({code or status}, {tries})")
        message = str(error.get("Message") or f"HTTP {status}").splitlines()[0]
        return StorageError(f"{where}: {code}: {message}")

    # -- the six methods -----------------------------------------------------

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _write_args(self, metadata: Mapping[str, str] | None = None,
                    retain_until: dt.datetime | None = None) -> dict[str, Any]:
        o = self.options
        args: dict[str, Any] = {"StorageClass": o.storage_class, "ServerSideEncryption": o.sse,
                                "SSEKMSKeyId": o.sse_kms_key_id, "Metadata": dict(metadata) if metadata else None,
                                **self._lock_args(retain_until)}
        return {k: v for k, v in args.items() if v}

    def _lock_args(self, retain_until: dt.datetime | None) -> dict[str, Any]:
        """ObjectLockMode and ObjectLockRetainUntilDate for backup data, when configured."""
        mode = self.options.object_lock
        if mode is None or retain_until is None:
            return {}
        now = dt.datetime.now(dt.timezone.utc)
        until = max(retain_until, now + dt.timedelta(days=self.options.object_lock_min_days))
        if until <= now:
            if not self._warned_no_lock:
                self._warned_no_lock = True
                log.warning("object_lock is set but neither the job's retention policy (keep_within, "
                            "pitr_window) nor object_lock_min_days gives a retention: objects are not locked",
                            location=self.location)
            return {}
        if until.microsecond:  # S3 keeps whole seconds: round up, never down
            until = until.replace(microsecond=0) + dt.timedelta(seconds=1)
        return {"ObjectLockMode": mode.upper(), "ObjectLockRetainUntilDate": until}

    def put(
        self,
        key: str,
        source: Readable,
        *,
        if_absent: bool = False,
        metadata: Metadata | None = None,
        retain_until: dt.datetime | None = None,
    ) -> ObjectInfo:
        name = self._name(key)
        condition = {"IfNoneMatch": "*"} if if_absent else {}
        with self._errors(key):
            parts = self._parts(source)
            first = next(parts, None)
            second = next(parts, None) if first is not None and first.length == self.options.part_size else None
            if second is None:  # the source is read to its end: deferred metadata is complete
                body = first if first is not None else b""
                metadata = resolve_metadata(metadata)
                self._client.put_object(Bucket=self.bucket, Key=name, Body=body,
                                        **self._write_args(metadata, retain_until), **condition)
                size = len(body)
            else:
                if if_absent and self._exists(key):  # fail early; the condition on completing decides
                    raise ObjectExists(f"{self.location}{key}: already exists")
                metadata = resolve_metadata(metadata)  # needed before the parts: the function works it out
                assert first is not None  # a second part implies a first
                size = self._put_multipart(name, itertools.chain((first, second), parts), condition, metadata,
                                           retain_until)
        return ObjectInfo(key=key, size=size, modified=dt.datetime.now(dt.timezone.utc),
                          metadata=dict(metadata) if metadata is not None else None)

    def _parts(self, source: Readable) -> Iterator[_Part]:
        size = self.options.part_size
        while True:
            part = _Part(source, size)
            if not part.length:
                return
            yield part
            if part.length < size:
                return

    def _put_multipart(self, name: str, parts: Iterator[_Part], condition: dict[str, str],
                       metadata: Mapping[str, str] | None = None, retain_until: dt.datetime | None = None) -> int:
        limit = self.options.max_concurrency
        upload_id = self._client.create_multipart_upload(
            Bucket=self.bucket, Key=name, **self._write_args(metadata, retain_until))["UploadId"]
        pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="s3-part")
        pending: set[Future[dict[str, Any]]] = set()
        done: list[dict[str, Any]] = []
        size = 0
        try:
            for number, part in enumerate(parts, start=1):
                if number > MAX_PARTS:
                    raise StorageError(f"s3://{self.bucket}/{name}: more than {MAX_PARTS} parts of "
                                       f"{self.options.part_size} bytes; raise part_size")
                if len(pending) >= limit:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    done += (f.result() for f in finished)
                size += part.length
                pending.add(pool.submit(self._upload_part, name, upload_id, number, part))
            finished, pending = wait(pending)
            done += (f.result() for f in finished)
            done.sort(key=lambda p: p["PartNumber"])
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": done}, **condition)
        except BaseException:
            # Let in-flight parts finish first: a part landing after the abort would be billed forever.
            pool.shutdown(wait=True, cancel_futures=True)
            self._abort(name, upload_id)
            raise
        finally:
            pool.shutdown(wait=False)
        return size

    def _upload_part(self, name: str, upload_id: str, number: int, part: _Part) -> dict[str, Any]:
        try:
            resp = self._client.upload_part(
                Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=part)
        finally:
            part.release()  # whoever still refers to the part, its memory is free
        # The part's checksum (botocore adds one) must be repeated when completing.
        return {"PartNumber": number, **{k: v for k, v in resp.items() if k == "ETag" or k in _PART_CHECKSUMS}}

    def _abort(self, name: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
        except Exception as exc:  # the original error matters more; say what was left behind
            log.warning("multipart upload not aborted", location=f"s3://{self.bucket}/{name}",
                        upload_id=upload_id, error=type(exc).__name__)

    def _exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def open(self, key: str) -> BinaryIO:
        name = self._name(key)
        with self._errors(key):
            body = self._client.get_object(Bucket=self.bucket, Key=name)["Body"]
        raw = _Body(body, lambda: self._errors(key))
        return io.BufferedReader(raw, buffer_size=READ_BUFFER)  # type: ignore[return-value]

    def read_versioned(self, key: str, limit: int) -> Versioned:
        name = self._name(key)
        with self._errors(key):
            resp = self._client.get_object(Bucket=self.bucket, Key=name)
            if resp.get("ContentLength", 0) > limit:
                resp["Body"].close()
                raise StorageError(f"{self.location}{key}: larger than the limit of {limit} bytes; not read")
            data = resp["Body"].read(limit + 1)
        return Versioned(data, str(resp["ETag"]))

    def replace(self, key: str, data: bytes, *, version: str | None) -> str:
        """One PutObject with If-Match (the ETag read) or If-None-Match: *; a failed condition
        (412, or 409 for a concurrent conditional write) is ObjectChanged."""
        name = self._name(key)
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            with self._errors(key):
                resp = self._client.put_object(Bucket=self.bucket, Key=name, Body=data, **self._write_args(),
                                               **condition)
        except (ObjectExists, ObjectNotFound):  # 412 PreconditionFailed; If-Match on a deleted object
            raise ObjectChanged(f"{self.location}{key}: changed since it was read (another writer)") from None
        except StorageError as exc:
            if "ConditionalRequestConflict" in str(exc):
                raise ObjectChanged(f"{self.location}{key}: changed since it was read (another writer)") from None
            raise
        return str(resp["ETag"])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self._list(prefix, {})

    def list_after(self, prefix: str, start_after: str) -> Iterator[ObjectInfo]:
        return self._list(prefix, {"StartAfter": self._name(start_after)})

    def _list(self, prefix: str, extra: dict[str, str]) -> Iterator[ObjectInfo]:
        start = len(self.prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix, **extra):
                for obj in page.get("Contents", ()):
                    if not obj["Key"].endswith("/"):  # "folder" markers made by consoles
                        yield ObjectInfo(obj["Key"][start:], obj["Size"], obj.get("LastModified"))

    def sweep(self, prefix: str, *, remove: bool = True) -> builtins.list[str]:
        """Unfinished multipart uploads under ``prefix`` (a killed upload's parts are billed until aborted)."""
        found = []
        paginator = self._client.get_paginator("list_multipart_uploads")
        with self._errors():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for upload in page.get("Uploads", ()):
                    found.append(f"{upload['Key'][len(self.prefix):]} (unfinished upload {upload['UploadId']})")
                    if remove:
                        self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                            UploadId=upload["UploadId"])
        return found

    def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)
        try:
            with self._errors(key):
                resp = self._client.head_object(Bucket=self.bucket, Key=name)
        except ObjectNotFound:
            self._check_bucket()  # HEAD says 404 for a missing bucket too
            raise
        return ObjectInfo(key, resp["ContentLength"], resp.get("LastModified"), resp.get("Metadata") or {},
                          _locked_until(resp))

    def _check_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                raise StorageUnavailable(f"{self.location}: bucket does not exist") from exc
        except BotoCoreError:
            pass

    def delete(self, key: str) -> None:
        name = self._name(key)
        with self._errors(key):
            if not self._lock_enabled():
                self._client.delete_object(Bucket=self.bucket, Key=name)
                return
            # Every version, oldest first: if one is locked, the key still reads as before.
            for version_id in self._versions(name):
                try:
                    self._client.delete_object(Bucket=self.bucket, Key=name, VersionId=version_id)
                except ClientError as exc:
                    if str(exc.response.get("Error", {}).get("Code", "")) not in _DENIED:
                        raise
                    until = self._version_lock(name, version_id)
                    if until is None:
                        raise  # denied for another reason (no s3:DeleteObjectVersion?)
                    what = "under legal hold" if until == LOCKED_INDEFINITELY else \
                        f"locked until {format_timestamp(until)}"
                    raise ObjectLocked(f"{self.location}{key}: {what} (Object Lock)", until=until) from exc

    def can_lock(self) -> bool:
        with self._errors():
            return self._lock_enabled()

    def _lock_enabled(self) -> bool:
        """Whether the bucket has Object Lock enabled; asked once, then cached."""
        if self._bucket_locked is None:
            try:
                config = self._client.get_object_lock_configuration(Bucket=self.bucket)
                enabled = config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
            except ClientError as exc:
                # ObjectLockConfigurationNotFoundError; or a policy or server that does not allow asking
                # (AccessDenied, NotImplemented): then deletes stay plain, as without Object Lock.
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
                if exc.response.get("Error", {}).get("Code") == "NoSuchBucket" or status >= 500:
                    raise
                enabled = False
            self._bucket_locked = enabled
        return self._bucket_locked

    def _versions(self, name: str) -> builtins.list[str]:
        """Version ids (delete markers included) of exactly ``name``, oldest first."""
        found: builtins.list[tuple[bool, dt.datetime, str]] = []
        paginator = self._client.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=name):
            for item in itertools.chain(page.get("Versions", ()), page.get("DeleteMarkers", ())):
                if item["Key"] == name:
                    found.append((bool(item.get("IsLatest")), item["LastModified"], item["VersionId"]))
        return [version_id for _, _, version_id in sorted(found)]

    def _version_lock(self, name: str, version_id: str) -> dt.datetime | None:
        try:
            resp = self._client.head_object(Bucket=self.bucket, Key=name, VersionId=version_id)
        except ClientError:
            return None
        return _locked_until(resp)

    def close(self) -> None:
        self._client.close()


def _locked_until(head: Mapping[str, Any]) -> dt.datetime | None:
    """From a head_object response: until when Object Lock holds the object (None: it does not)."""
    if head.get("ObjectLockLegalHoldStatus") == "ON":
        return LOCKED_INDEFINITELY
    until = head.get("ObjectLockRetainUntilDate")
    if isinstance(until, dt.datetime) and until > dt.datetime.now(dt.timezone.utc):
        return until.astimezone(dt.timezone.utc)
    return None


def _read(source: Readable, size: int) -> bytes:
    data = source.read(size)
    if len(data) > size:
        raise ValueError(f"source returned {len(data)} bytes, more than the {size} asked for")
    return data
