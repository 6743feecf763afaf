"""Where documents come from: the ``Storage`` protocol, a local directory and S3.

Reads are streams of byte pieces, never whole objects, so memory stays bounded
by the piece size. Both backends translate their failures into the worker's
error classes: a missing object is a ``PermanentError`` naming the key (the job
goes to the dead-letter queue); network trouble, throttling and refused
credentials are transient (the job is retried, and a breaker around storage can
pause the worker), because they are fixed outside the job.

Both backends are ``VersionedStorage``: ``stat(key)`` tells an object's version
(the S3 ETag; a local file's size and modification time in nanoseconds), and
``list_objects(prefix)`` streams ``ObjectInfo`` page by page, which is what a
bucket sync walks (in the server's order: AWS lists keys in UTF-8 byte order,
SeaweedFS folder by folder; ``LocalStorage`` uses byte order). A read given ``version=`` serves that
version or raises ``VersionChangedError``: S3 sends it as ``If-Match`` and also
checks the ETag of the response (for servers that ignore the header); a local
read checks the open file against it, and again at the end (a file rewritten in
place while it was read).

``S3Storage`` keeps one aiobotocore client per worker, opened with ``open()``
(or ``async with``) and closed with ``aclose()``. botocore's standard retry mode
covers failed requests; a body stream that breaks half-way (which botocore does
not retry) is resumed with a ranged GET from the last byte received, pinned to
the object's ETag so a replaced object is never stitched onto the old one.
Credentials are held as ``SecretStr`` and scrubbed from every message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat as stat_mode
import tempfile
from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

from pydantic import SecretStr

from worker_core.errors import PermanentError, RetryableError, TransientError, WorkerCoreError
from worker_core.logs import StructuredLogger

if TYPE_CHECKING:
    from worker_core.config import StorageSettings

__all__ = [
    "LocalStorage",
    "ObjectInfo",
    "S3Storage",
    "Storage",
    "VersionChangedError",
    "VersionedStorage",
    "storage_from_config",
]

#: Bytes per piece of a streamed read.
READ_SIZE = 1 << 20
#: Bytes per part of a streamed multipart upload (S3's minimum is 5 MiB).
PART_SIZE = 8 << 20

_log = StructuredLogger("worker_core.ingest.storage")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object: its key (without the storage prefix), version and size."""

    key: str
    version: str
    size: int


class VersionChangedError(TransientError):
    """The object is no longer the version the read was pinned to (it was replaced,
    rewritten or removed and re-created). Reading on would stitch two versions."""


@runtime_checkable
class Storage(Protocol):
    """A store of documents addressed by key."""

    def open_stream(self, key: str, *, start: int = 0) -> AsyncGenerator[bytes, None]:
        """The object's bytes from ``start``, piece by piece (an async generator:
        close it with ``contextlib.aclosing`` when stopping early)."""
        ...

    async def size(self, key: str) -> int: ...

    async def exists(self, key: str) -> bool: ...

    async def put(self, key: str, data: bytes | AsyncIterable[bytes]) -> None: ...

    async def health_check(self) -> None:
        """Return if the store answers; raise ``TransientError`` saying why not."""
        ...

    async def open(self) -> Any: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class VersionedStorage(Storage, Protocol):
    """A ``Storage`` that knows its objects' versions and lists them in key order."""

    def open_stream(
        self, key: str, *, start: int = 0, version: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        """As ``Storage.open_stream``; with ``version``, only that version is read
        (``VersionChangedError`` otherwise)."""
        ...

    async def stat(self, key: str) -> ObjectInfo:
        """The object's version and size (``PermanentError`` when it does not exist)."""
        ...

    def list_objects(self, prefix: str = "") -> AsyncGenerator[ObjectInfo, None]:
        """Every object whose key starts with ``prefix``, in the backend's order."""
        ...


def storage_from_config(settings: StorageSettings) -> LocalStorage | S3Storage:
    """The backend ``settings.backend`` names, not yet opened."""
    if settings.backend == "s3":
        return S3Storage.from_settings(settings)
    return LocalStorage(settings.local_root)


class _Lifecycle:
    async def open(self) -> Self:
        return self

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# -- a local directory ---------------------------------------------------------------
class LocalStorage(_Lifecycle):
    """Documents as files under ``root``; keys are relative paths with ``/``.

    File I/O runs in threads so the event loop never blocks on a disk.
    """

    def __init__(self, root: str | os.PathLike[str], *, read_size: int = READ_SIZE) -> None:
        self.root = Path(root)
        self.read_size = read_size

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """The file of ``key``; a key that would leave the root is refused.

        Raises:
            PermanentError: the key is empty, absolute, or escapes the root
                (``..``, a symbolic link pointing outside).
        """
        if not key or key.startswith(("/", "\\")) or "\\" in key or "\x00" in key:
            raise PermanentError(f"storage key {key!r} is not a relative path", key=key)
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise PermanentError(f"storage key {key!r} escapes the storage root", key=key)
        root = self.root.resolve()
        path = (root / key).resolve()
        if not path.is_relative_to(root) or path == root:
            raise PermanentError(f"storage key {key!r} escapes the storage root", key=key)
        return path

    async def open_stream(
        self, key: str, *, start: int = 0, version: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        path = self.path(key)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise self._not_found(key) from None
        except (IsADirectoryError, NotADirectoryError):
            raise PermanentError(f"storage key {key!r} is not a file", key=key) from None
        except OSError as exc:
            raise TransientError(f"cannot open {key!r}: {exc.strerror}", key=key) from exc
        try:
            # The open file is one inode: an atomic replace (put) cannot change what
            # it reads, but a rewrite in place can, which the check at the end sees.
            opened = _local_version(await asyncio.to_thread(os.fstat, handle.fileno()))
            if version is not None and opened != version:
                raise VersionChangedError(
                    f"{key!r} changed since it was first read (version {opened}, pinned {version})",
                    key=key,
                )
            if start:
                await asyncio.to_thread(handle.seek, start)
            while piece := await asyncio.to_thread(handle.read, self.read_size):
                yield piece
            ended = _local_version(await asyncio.to_thread(os.fstat, handle.fileno()))
            if ended != opened:
                raise VersionChangedError(f"{key!r} was rewritten while it was read", key=key)
        finally:
            await asyncio.to_thread(handle.close)

    def _not_found(self, key: str) -> PermanentError:
        return PermanentError(f"document {key!r} not found in {self.root}", key=key)

    async def size(self, key: str) -> int:
        return (await self.stat(key)).size

    async def stat(self, key: str) -> ObjectInfo:
        path = self.path(key)
        try:
            info = await asyncio.to_thread(path.stat)
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found(key) from None
        if not stat_mode.S_ISREG(info.st_mode):
            raise PermanentError(f"storage key {key!r} is not a file", key=key)
        return ObjectInfo(key, _local_version(info), info.st_size)

    async def list_objects(self, prefix: str = "") -> AsyncGenerator[ObjectInfo, None]:
        """Files under the root whose key starts with ``prefix``, in key order.

        Directories are read one at a time (memory grows with the largest
        directory, not with the tree). Symbolic links, the temporary files of
        ``put`` and names that are not valid UTF-8 are skipped.
        """
        if "\x00" in prefix or "\\" in prefix or prefix.startswith("/"):
            raise PermanentError(f"storage prefix {prefix!r} is not a relative path")
        folder, _, _ = prefix.rpartition("/")
        if any(part in ("", ".", "..") for part in folder.split("/")) and folder:
            raise PermanentError(f"storage prefix {prefix!r} escapes the storage root")
        base = self.root / folder if folder else self.root
        async for info in self._walk(base, f"{folder}/" if folder else "", prefix):
            yield info

    async def _walk(
        self, directory: Path, stem: str, prefix: str
    ) -> AsyncGenerator[ObjectInfo, None]:
        for name, is_dir, size, version in await asyncio.to_thread(_scan, directory):
            key = f"{stem}{name}"
            if is_dir:
                # Descend when the directory's keys can match: "a/" under prefix "a/b",
                # or anything under prefix "a".
                if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                    async for info in self._walk(directory / name, key + "/", prefix):
                        yield info
            elif key.startswith(prefix):
                yield ObjectInfo(key, version, size)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path(key).is_file)

    async def put(self, key: str, data: bytes | AsyncIterable[bytes]) -> None:
        """Write ``key`` atomically: readers see the old file or the whole new one."""
        path = self.path(key)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        fd, tmp = await asyncio.to_thread(
            tempfile.mkstemp, dir=path.parent, prefix=f".{path.name}.", suffix=".part"
        )
        try:
            with os.fdopen(fd, "wb") as handle:
                if isinstance(data, bytes | bytearray | memoryview):
                    await asyncio.to_thread(handle.write, data)
                else:
                    async for piece in data:
                        await asyncio.to_thread(handle.write, piece)
            await asyncio.to_thread(os.replace, tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def health_check(self) -> None:
        if not await asyncio.to_thread(self.root.is_dir):
            raise TransientError(f"storage root {self.root} is not a directory")


def _local_version(info: os.stat_result) -> str:
    # Size and nanosecond mtime: a copy that keeps modification times (rsync -a, a
    # restored backup) keeps its versions, where an inode number would not.
    return f"{info.st_size}-{info.st_mtime_ns}"


def _scan(directory: Path) -> list[tuple[str, bool, int, str]]:
    """(name, is_dir, size, version) of a directory's entries, in key order."""
    found: list[tuple[str, str, bool, int, str]] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise TransientError(f"cannot list {directory}: {exc.strerror}") from exc
    for entry in entries:
        name = entry.name
        if entry.is_symlink() or (name.startswith(".") and name.endswith(".part")):
            continue
        try:
            name.encode()
        except UnicodeEncodeError:  # undecodable bytes in the name (surrogateescape)
            _log.warning("storage_key_skipped", directory=str(directory), reason="not UTF-8")
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                found.append((name + "/", name, True, 0, ""))
            elif entry.is_file(follow_symlinks=False):
                info = entry.stat(follow_symlinks=False)
                found.append((name, name, False, info.st_size, _local_version(info)))
        except FileNotFoundError:  # removed while listing
            continue
    # A directory sorts as its name plus "/": "a.txt" < "a/x" as in S3's byte order.
    found.sort(key=lambda item: item[0])
    return [item[1:] for item in found]


# -- S3 ---------------------------------------------------------------------------------
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
