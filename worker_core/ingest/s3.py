"""``S3Storage``: documents in an S3 bucket (AWS or any compatible server).

One aiobotocore client per worker, opened with ``open()`` (or ``async with``) and
closed with ``aclose()``. botocore's standard retry mode covers failed requests;
a body stream that breaks half-way (which botocore does not retry) is resumed
with a ranged GET from the last byte received, pinned to the object's ETag
(``If-Match``, and the ETag of the answer is checked too, for servers that ignore
the header), so a replaced object is never stitched onto the old one. Failures
map onto the worker's errors as ``storage.py`` describes. Credentials are held as
``SecretStr`` and scrubbed from every message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterable
from typing import TYPE_CHECKING, Any, Self

from pydantic import SecretStr

from worker_core.errors import PermanentError, RetryableError, TransientError, WorkerCoreError

from .storage import PART_SIZE, READ_SIZE, ObjectInfo, VersionChangedError, _Lifecycle, _log

if TYPE_CHECKING:
    from worker_core.config import StorageSettings

__all__ = ["S3Storage"]


def _stream_errors() -> tuple[type[BaseException], ...]:
    import aiohttp
    from botocore.exceptions import (
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    return (
        ResponseStreamingError,
        IncompleteReadError,
        ReadTimeoutError,
        aiohttp.ClientError,
        asyncio.TimeoutError,
        ConnectionError,
    )


_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
_REFUSED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "403",
}
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "503"}


class S3Storage(_Lifecycle):
    """Documents in an S3 bucket (AWS or any compatible server) under ``prefix``.

    Args:
        bucket: the bucket.
        prefix: prepended to every key (a ``/`` is added when missing).
        endpoint_url: a compatible server (MinIO, SeaweedFS, ...); ``None`` is AWS.
        region: the signing region (``us-east-1`` when not given).
        access_key_id / secret_access_key: ``None`` uses botocore's default chain
            (environment, profile, instance role).
        max_pool_connections: concurrent requests of the one client.
        max_attempts: botocore's standard-mode attempts per request.
        read_size: bytes per streamed piece.
        max_resumes: ranged re-reads allowed per stream after a broken body.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | SecretStr | None = None,
        secret_access_key: str | SecretStr | None = None,
        max_pool_connections: int = 20,
        max_attempts: int = 5,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        read_size: int = READ_SIZE,
        max_resumes: int = 5,
    ) -> None:
        if not bucket:
            raise ValueError("S3Storage needs a bucket")
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.region = region or "us-east-1"
        self._access_key = _secret(access_key_id)
        self._secret_key = _secret(secret_access_key)
        self.max_pool_connections = max_pool_connections
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.read_size = read_size
        self.max_resumes = max_resumes
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    @classmethod
    def from_settings(cls, settings: StorageSettings) -> S3Storage:
        if not settings.bucket:
            raise ValueError("storage.bucket is required for the s3 backend")
        return cls(
            settings.bucket,
            prefix=settings.prefix,
            endpoint_url=settings.endpoint_url,
            region=settings.region,
            access_key_id=settings.access_key_id,
            secret_access_key=settings.secret_access_key,
            max_pool_connections=settings.max_pool_connections,
        )

    def __repr__(self) -> str:
        where = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r}{where})"

    # -- lifecycle -------------------------------------------------------------------
    async def open(self) -> Self:
        """Create the client (idempotent); every call after this shares it."""
        if self._client is not None:
            return self
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        config = AioConfig(
            retries={"mode": "standard", "max_attempts": self.max_attempts},
            max_pool_connections=self.max_pool_connections,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            # Compatible servers on a host name or IP want path-style addressing.
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                get_session().create_client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    aws_access_key_id=_reveal(self._access_key),
                    aws_secret_access_key=_reveal(self._secret_key),
                    config=config,
                )
            )
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def aclose(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("S3Storage is not open: use `async with` or `await open()`")
        return self._client

    def key(self, key: str) -> str:
        """The object key of ``key`` (with the prefix)."""
        if not key:
            raise PermanentError("storage key is empty")
        return self.prefix + key.lstrip("/")

    # -- reads -----------------------------------------------------------------------
    async def _get_body(self, key: str, start: int, etag: str | None) -> tuple[Any, str | None]:
        """GET the object from byte ``start``: its streaming body and ETag."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(key)}
        if start:
            args["Range"] = f"bytes={start}-"
        if etag:
            args["IfMatch"] = etag
        response = await self.client.get_object(**args)
        return response["Body"], response.get("ETag")

    async def open_stream(
        self, key: str, *, start: int = 0, version: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        stream_errors = _stream_errors()
        offset, etag, resumes = start, version, 0
        while True:
            try:
                body, tag = await self._get_body(key, offset, etag)
            except Exception as exc:
                if offset and _code(exc) == "InvalidRange":
                    info = await self.stat(key)
                    if etag is not None and info.version != etag:
                        raise VersionChangedError(
                            f"{key!r} in bucket {self.bucket!r} changed since it was first read",
                            key=key,
                        ) from exc
                    if info.size <= offset:
                        return  # nothing left after ``offset``
                raise self._error(exc, key, "read") from exc
            if etag is not None and tag is not None and tag != etag:
                # A server that ignores If-Match still names what it sent.
                async with body:
                    pass
                raise VersionChangedError(
                    f"{key!r} in bucket {self.bucket!r} changed since it was first read",
                    key=key,
                    bucket=self.bucket,
                )
            etag = etag or tag
            try:
                async with body:
                    async for piece in body.iter_chunks(self.read_size):
                        offset += len(piece)
                        yield piece
                return
            except stream_errors as exc:
                resumes += 1
                if resumes > self.max_resumes:
                    raise TransientError(
                        f"reading {key!r} from S3 broke {resumes} times (last at byte {offset}): "
                        f"{self._scrub(type(exc).__name__ + ': ' + str(exc))}",
                        key=key,
                        offset=offset,
                    ) from exc
                _log.warning(
                    "s3_stream_resumed", key=key, offset=offset, resumes=resumes, error=repr(exc)
                )

    async def size(self, key: str) -> int:
        return (await self.stat(key)).size

    async def stat(self, key: str) -> ObjectInfo:
        try:
            response = await self.client.head_object(Bucket=self.bucket, Key=self.key(key))
        except Exception as exc:
            raise self._error(exc, key, "stat") from exc
        return ObjectInfo(key, str(response["ETag"]), int(response["ContentLength"]))

    async def list_objects(self, prefix: str = "") -> AsyncGenerator[ObjectInfo, None]:
        """Objects whose key (after ``self.prefix``) starts with ``prefix``, page by page
        (1000 keys per request), in the server's order. Folder markers (keys ending
        in ``/``) are skipped."""
        paginator = self.client.get_paginator("list_objects_v2")
        cut = len(self.prefix)
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix.lstrip("/"))
        try:
            async for page in pages:
                for item in page.get("Contents", ()):
                    key = item["Key"][cut:]
                    if key and not key.endswith("/"):
                        yield ObjectInfo(key, str(item["ETag"]), int(item["Size"]))
        except WorkerCoreError:
            raise
        except Exception as exc:
            raise self._error(exc, None, f"list prefix {prefix!r} of") from exc

    async def exists(self, key: str) -> bool:
        try:
            await self.client.head_object(Bucket=self.bucket, Key=self.key(key))
        except Exception as exc:
            if _code(exc) in _NOT_FOUND:
                return False
            raise self._error(exc, key, "stat") from exc
        return True

    # -- writes ----------------------------------------------------------------------
    async def put(self, key: str, data: bytes | AsyncIterable[bytes]) -> None:
        """Store ``data`` (bytes, or a stream uploaded in parts of ``PART_SIZE``)."""
        try:
            if isinstance(data, bytes | bytearray | memoryview):
                await self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=data)
            else:
                await self._put_stream(self.key(key), data)
        except WorkerCoreError:
            raise
        except Exception as exc:
            raise self._error(exc, key, "write") from exc

    async def _put_stream(self, full_key: str, data: AsyncIterable[bytes]) -> None:
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            async for piece in data:
                buffer += piece
                while len(buffer) >= PART_SIZE:
                    if upload_id is None:
                        created = await self.client.create_multipart_upload(
                            Bucket=self.bucket, Key=full_key
                        )
                        upload_id = created["UploadId"]
                    part, buffer = bytes(buffer[:PART_SIZE]), buffer[PART_SIZE:]
                    number = len(parts) + 1
                    sent = await self.client.upload_part(
                        Bucket=self.bucket,
                        Key=full_key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=part,
                    )
                    parts.append({"PartNumber": number, "ETag": sent["ETag"]})
            if upload_id is None:  # small enough for one request
                await self.client.put_object(Bucket=self.bucket, Key=full_key, Body=bytes(buffer))
                return
            if buffer:
                number = len(parts) + 1
                sent = await self.client.upload_part(
                    Bucket=self.bucket,
                    Key=full_key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=bytes(buffer),
                )
                parts.append({"PartNumber": number, "ETag": sent["ETag"]})
            await self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full_key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            if upload_id is not None:
                with contextlib.suppress(Exception):
                    await self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=full_key, UploadId=upload_id
                    )
            raise

    async def health_check(self) -> None:
        try:
            await self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self._error(exc, None, "reach bucket") from exc

    # -- errors ----------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        for secret in (self._secret_key, self._access_key):
            value = _reveal(secret)
            if value and len(value) >= 4:
                text = text.replace(value, "***")
        return text

    def _error(self, exc: BaseException, key: str | None, action: str) -> WorkerCoreError:
        """``exc`` as a worker error whose message names the key and hides credentials."""
        if isinstance(exc, WorkerCoreError):
            return exc
        what = f"{key!r} in bucket {self.bucket!r}" if key else f"bucket {self.bucket!r}"
        code = _code(exc)
        detail: dict[str, Any] = {"key": key, "bucket": self.bucket, "code": code}
        if code in _NOT_FOUND and key is not None:
            return PermanentError(f"document {what} not found (S3 {code})", **detail)
        if code == "NoSuchBucket" or (code in _NOT_FOUND and key is None):
            return TransientError(
                f"bucket {self.bucket!r} does not exist; check storage.bucket", **detail
            )
        if code in _REFUSED:
            return TransientError(
                f"S3 refused to {action} {what}: {code}; check storage.access_key_id and "
                "storage.secret_access_key and the bucket policy",
                **detail,
            )
        if code == "PreconditionFailed":
            return VersionChangedError(
                f"{what} was replaced since it was first read; reading on would stitch "
                "two versions",
                **detail,
            )
        if code in _THROTTLED:
            return RetryableError(f"S3 is throttling requests ({code}) for {what}", **detail)
        message = self._scrub(str(exc))
        if code in _CLIENT_FAULTS:
            return PermanentError(f"S3 refused to {action} {what}: {message}", **detail)
        return TransientError(f"cannot {action} {what}: {type(exc).__name__}: {message}", **detail)


# Request errors that name a problem with this request, not with the service.
# Other 4xx codes are not all permanent (400 RequestTimeout, 409 conflicts), so
# anything unknown is transient and bounded by retry.max_attempts.
_CLIENT_FAULTS = {"InvalidObjectState", "KeyTooLongError", "InvalidArgument", "InvalidRequest"}


def _code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(status) if status else None
    return None


def _secret(value: str | SecretStr | None) -> SecretStr | None:
    if value is None or isinstance(value, SecretStr):
        return value
    return SecretStr(value)


def _reveal(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
