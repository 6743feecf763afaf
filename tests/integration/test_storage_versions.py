"""Object versions and listings: local files and a real S3 endpoint (weed mini)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

from worker_core.errors import PermanentError
from worker_core.ingest.storage import (
    LocalStorage,
    ObjectInfo,
    S3Storage,
    VersionChangedError,
    VersionedStorage,
)

KEYS = ["a.txt", "a/b.txt", "a/c/d.txt", "a0.txt", "b/x.txt", "é/ü.txt", "z.txt"]


async def read(storage: Any, key: str, *, start: int = 0, version: str | None = None) -> bytes:
    async with aclosing(storage.open_stream(key, start=start, version=version)) as stream:
        return b"".join([piece async for piece in stream])


async def listing(storage: Any, prefix: str = "") -> list[ObjectInfo]:
    async with aclosing(storage.list_objects(prefix)) as found:
        return [info async for info in found]


def utf8_sorted(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode())


# -- local ------------------------------------------------------------------------------
async def test_local_versions_are_size_and_mtime(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    assert isinstance(storage, VersionedStorage)
    await storage.put("doc.txt", b"first")
    info = await storage.stat("doc.txt")
    st = (tmp_path / "doc.txt").stat()
    assert info == ObjectInfo("doc.txt", f"{st.st_size}-{st.st_mtime_ns}", 5)
    assert await read(storage, "doc.txt", version=info.version) == b"first"
    assert await read(storage, "doc.txt", start=2, version=info.version) == b"rst"
    # A copy that keeps the modification time keeps the version.
    os.utime(tmp_path / "doc.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (await storage.stat("doc.txt")).version == info.version
    await storage.put("doc.txt", b"second")
    with pytest.raises(VersionChangedError, match=r"'doc\.txt' changed since it was first read"):
        await read(storage, "doc.txt", start=2, version=info.version)
    with pytest.raises(PermanentError, match="not found"):
        await storage.stat("absent.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(PermanentError, match="not a file"):
        await storage.stat("folder")


async def test_local_file_rewritten_in_place_while_read_is_refused(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, read_size=4)
    path = tmp_path / "doc.txt"
    path.write_bytes(b"0123456789abcdef")
    async with aclosing(storage.open_stream("doc.txt")) as stream:
        first = await anext(stream)
        assert first == b"0123"
        with path.open("r+b") as handle:  # same inode, new bytes and length
            handle.write(b"XXXXXXXXXXXXXXXXXXXXXXXX")
        with pytest.raises(VersionChangedError, match="rewritten while it was read"):
            async for _ in stream:
                pass


async def test_local_listing_is_in_byte_order_and_respects_the_prefix(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for key in KEYS:
        await storage.put(key, key.encode())
    (tmp_path / "a" / ".x.txt.123.part").write_bytes(b"an interrupted put")
    (tmp_path / "link.txt").symlink_to(tmp_path / "z.txt")
    (tmp_path / "empty").mkdir()
    found = await listing(storage)
    assert [i.key for i in found] == utf8_sorted(KEYS)
    assert found[0] == await storage.stat("a.txt")
    assert [i.key for i in await listing(storage, "a/")] == ["a/b.txt", "a/c/d.txt"]
    assert [i.key for i in await listing(storage, "a")] == [
        "a.txt",
        "a/b.txt",
        "a/c/d.txt",
        "a0.txt",
    ]
    assert [i.key for i in await listing(storage, "a/c/d")] == ["a/c/d.txt"]
    assert [i.key for i in await listing(storage, "nothing/")] == []
    for bad in ("../", "a/../../", "/etc/"):
        with pytest.raises(PermanentError):
            await listing(storage, bad)


# -- S3 ------------------------------------------------------------------------------------
@pytest.fixture
async def s3(s3_endpoint: Any, s3_bucket: str) -> AsyncIterator[S3Storage]:
    async with S3Storage(
        s3_bucket,
        prefix="docs",
        endpoint_url=s3_endpoint.url,
        access_key_id=s3_endpoint.access_key,
        secret_access_key=s3_endpoint.secret_key,
        max_attempts=2,
    ) as storage:
        yield storage


@pytest.mark.s3
async def test_s3_versions_are_etags_and_if_match_pins_reads(s3: S3Storage) -> None:
    assert isinstance(s3, VersionedStorage)
    await s3.put("doc.txt", b"first version")
    info = await s3.stat("doc.txt")
    assert info.size == 13 and info.version.startswith('"')
    assert await read(s3, "doc.txt", start=6, version=info.version) == b"version"
    await s3.put("doc.txt", b"second version, longer")
    # weed mini honours If-Match: the server refuses the old version.
    with pytest.raises(VersionChangedError, match="replaced since it was first read"):
        await read(s3, "doc.txt", start=6, version=info.version)
    with pytest.raises(VersionChangedError):
        await read(s3, "doc.txt", version=info.version)
    # Past the end of the new object: the stat decides it changed.
    with pytest.raises(VersionChangedError):
        await read(s3, "doc.txt", start=40, version=info.version)


class IgnoresIfMatch(S3Storage):
    """A server that ignores If-Match: the ETag of the answer must still be checked."""

    async def _get_body(self, key: str, start: int, etag: str | None) -> tuple[Any, str | None]:
        return await super()._get_body(key, start, None)


@pytest.mark.s3
async def test_s3_server_ignoring_if_match_is_caught_by_the_etag(
    s3: S3Storage, s3_endpoint: Any
) -> None:
    await s3.put("doc.txt", b"first version")
    old = (await s3.stat("doc.txt")).version
    await s3.put("doc.txt", b"second version")
    async with IgnoresIfMatch(
        s3.bucket,
        prefix="docs",
        endpoint_url=s3_endpoint.url,
        access_key_id=s3_endpoint.access_key,
        secret_access_key=s3_endpoint.secret_key,
    ) as lax:
        assert await read(lax, "doc.txt", start=7) == b"version"
        with pytest.raises(VersionChangedError, match="changed since it was first read"):
            await read(lax, "doc.txt", start=7, version=old)


@pytest.mark.s3
async def test_s3_listing_strips_the_prefix_and_skips_folder_markers(
    s3: S3Storage, s3_endpoint: Any
) -> None:
    for key in KEYS:
        await s3.put(key, key.encode())
    async with s3_endpoint.client() as raw:  # outside the prefix, and a folder marker
        await raw.put_object(Bucket=s3.bucket, Key="other/a.txt", Body=b"x")
        await raw.put_object(Bucket=s3.bucket, Key="docs/folder/", Body=b"")
    found = await listing(s3)
    # Any order will do for a sync (SeaweedFS lists folder by folder, AWS by bytes).
    assert sorted(i.key for i in found) == sorted(KEYS)
    assert {i.key: i for i in found}["a/b.txt"] == await s3.stat("a/b.txt")
    assert sorted(i.key for i in await listing(s3, "a/")) == ["a/b.txt", "a/c/d.txt"]
    assert sorted(i.key for i in await listing(s3, "a")) == [
        "a.txt",
        "a/b.txt",
        "a/c/d.txt",
        "a0.txt",
    ]
