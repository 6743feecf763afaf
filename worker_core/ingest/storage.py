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

``S3Storage`` lives in ``s3.py`` (imported on first use, with aiobotocore) and is
also reachable here.
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

from worker_core.errors import PermanentError, TransientError
from worker_core.logs import StructuredLogger

if TYPE_CHECKING:
    from worker_core.config import StorageSettings

    from .s3 import S3Storage

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
        from .s3 import S3Storage

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


def __getattr__(name: str) -> Any:
    # S3Storage (and with it aiobotocore) is imported on first use.
    if name == "S3Storage":
        from .s3 import S3Storage

        return S3Storage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
