"""Storage backends: a local directory and a real S3 endpoint (weed mini)."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ResponseStreamingError

from worker_core.config import StorageSettings
from worker_core.errors import PermanentError, TransientError
from worker_core.ingest.storage import (
    LocalStorage,
    S3Storage,
    Storage,
    VersionChangedError,
    storage_from_config,
)

MiB = 1 << 20


def blob(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


async def read_all(storage: Storage, key: str, start: int = 0) -> bytes:
    async with aclosing(storage.open_stream(key, start=start)) as stream:
        return b"".join([piece async for piece in stream])


async def generated(total: int, piece: int = MiB) -> AsyncIterator[bytes]:
    for offset in range(0, total, piece):
        yield blob(min(piece, total - offset), seed=offset)


async def streamed_digest(storage: Storage, key: str) -> tuple[str, int, int]:
    """sha256 of the object, the number of pieces, and the peak Python allocation."""
    digest = hashlib.sha256()
    pieces = 0
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        async with aclosing(storage.open_stream(key)) as stream:
            async for piece in stream:
                digest.update(piece)
                pieces += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return digest.hexdigest(), pieces, peak


def expected_digest(total: int) -> str:
    digest = hashlib.sha256()
    for offset in range(0, total, MiB):
        digest.update(blob(min(MiB, total - offset), seed=offset))
    return digest.hexdigest()


# -- local ------------------------------------------------------------------------------
async def test_local_round_trip(tmp_path: Path) -> None:
    async with LocalStorage(tmp_path, read_size=7) as storage:
        assert isinstance(storage, Storage)
        await storage.put("docs/a/b.txt", b"hello, storage")
        assert await storage.exists("docs/a/b.txt")
        assert not await storage.exists("docs/a/missing.txt")
        assert await storage.size("docs/a/b.txt") == 14
        assert await read_all(storage, "docs/a/b.txt") == b"hello, storage"
        assert await read_all(storage, "docs/a/b.txt", start=7) == b"storage"
        assert await read_all(storage, "docs/a/b.txt", start=14) == b""
        await storage.put("docs/a/b.txt", generated(3 * MiB + 5))
        assert await storage.size("docs/a/b.txt") == 3 * MiB + 5
        assert sorted(p.name for p in (tmp_path / "docs" / "a").iterdir()) == ["b.txt"]
        await storage.health_check()


async def test_local_missing_key_is_permanent(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(PermanentError, match=r"'nope.txt' not found"):
        await read_all(storage, "nope.txt")
    with pytest.raises(PermanentError, match=r"'nope.txt' not found"):
        await storage.size("nope.txt")
    (tmp_path / "dir").mkdir()
    with pytest.raises(PermanentError, match="not a file"):
        await read_all(storage, "dir")


@pytest.mark.parametrize(
    "key",
    ["../secret", "a/../../secret", "/etc/passwd", "a\\..\\b", "", "a//b", "./a", "link/secret"],
)
async def test_local_keys_cannot_escape_the_root(tmp_path: Path, key: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret").write_text("no")
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(PermanentError, match="storage key"):
        await read_all(LocalStorage(root), key)


async def test_local_health_check_fails_without_a_root(tmp_path: Path) -> None:
    with pytest.raises(TransientError, match="not a directory"):
        await LocalStorage(tmp_path / "absent").health_check()


async def test_local_large_file_streams_in_bounded_memory(tmp_path: Path) -> None:
    total = 24 * MiB + 3
    storage = LocalStorage(tmp_path, read_size=256 * 1024)
    await storage.put("big.bin", generated(total))
    digest, pieces, peak = await streamed_digest(storage, "big.bin")
    assert digest == expected_digest(total)
    assert pieces == total // (256 * 1024) + 1
    assert peak < 4 * MiB, f"peak {peak:,} bytes"


# -- S3 ------------------------------------------------------------------------------------
@pytest.fixture
async def s3(s3_endpoint: Any, s3_bucket: str) -> AsyncIterator[S3Storage]:
    async with S3Storage(
        s3_bucket,
        prefix="docs",
        endpoint_url=s3_endpoint.url,
        region=s3_endpoint.region,
        access_key_id=s3_endpoint.access_key,
        secret_access_key=s3_endpoint.secret_key,
        max_attempts=2,
    ) as storage:
        yield storage


@pytest.mark.s3
async def test_s3_round_trip(s3: S3Storage, s3_endpoint: Any) -> None:
    assert isinstance(s3, Storage)
    await s3.health_check()
    await s3.put("a/b.txt", b"hello, s3")
    assert await s3.exists("a/b.txt")
    assert not await s3.exists("a/missing.txt")
    assert await s3.size("a/b.txt") == 9
    assert await read_all(s3, "a/b.txt") == b"hello, s3"
    assert await read_all(s3, "a/b.txt", start=7) == b"s3"
    assert await read_all(s3, "a/b.txt", start=9) == b""
    async with s3_endpoint.client() as raw:  # the prefix is really applied
        head = await raw.head_object(Bucket=s3.bucket, Key="docs/a/b.txt")
        assert head["ContentLength"] == 9


@pytest.mark.s3
async def test_s3_large_object_streams_in_pieces_with_bounded_memory(s3: S3Storage) -> None:
    total = 20 * MiB + 11  # a multipart upload of three parts
    await s3.put("big.bin", generated(total))
    assert await s3.size("big.bin") == total
    digest, pieces, peak = await streamed_digest(s3, "big.bin")
    assert digest == expected_digest(total)
    assert pieces >= total // MiB
    assert peak < 6 * MiB, f"peak {peak:,} bytes for a {total:,}-byte object"


class _BreakingBody:
    """A real S3 body that fails like a dropped connection after ``limit`` bytes."""

    def __init__(self, body: Any, limit: int) -> None:
        self.body = body
        self.limit = limit

    async def __aenter__(self) -> _BreakingBody:
        await self.body.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.body.__aexit__(*exc)

    async def iter_chunks(self, size: int) -> AsyncIterator[bytes]:
        sent = 0
        async for piece in self.body.iter_chunks(min(size, self.limit - sent) or 1):
            piece = piece[: self.limit - sent]
            sent += len(piece)
            yield piece
            if sent >= self.limit:
                raise ResponseStreamingError(error="connection reset by peer (test)")


class BreakingS3(S3Storage):
    """S3Storage whose first ``breaks`` bodies break mid-way; records each GET's start."""

    def __init__(
        self,
        *args: Any,
        breaks: int,
        limit: int,
        before_resume: Callable[[], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.breaks = breaks
        self.limit = limit
        self.before_resume = before_resume
        self.starts: list[int] = []

    async def _get_body(self, key: str, start: int, etag: str | None) -> tuple[Any, str | None]:
        if self.starts and self.before_resume is not None:
            await self.before_resume()
        self.starts.append(start)
        body, tag = await super()._get_body(key, start, etag)
        if len(self.starts) <= self.breaks:
            return _BreakingBody(body, self.limit), tag
        return body, tag


def breaking(s3: S3Storage, **kwargs: Any) -> BreakingS3:
    return BreakingS3(
        s3.bucket,
        prefix=s3.prefix,
        endpoint_url=s3.endpoint_url,
        access_key_id=s3._access_key,
        secret_access_key=s3._secret_key,
        read_size=64 * 1024,
        **kwargs,
    )


@pytest.mark.s3
async def test_s3_broken_stream_resumes_with_a_ranged_get(s3: S3Storage) -> None:
    data = blob(3 * MiB + 17)
    await s3.put("doc.bin", data)
    async with breaking(s3, breaks=2, limit=700_000) as storage:
        assert await read_all(storage, "doc.bin") == data
        assert storage.starts == [0, 700_000, 1_400_000]
        # Resuming a stream that was itself opened at an offset.
        storage.starts.clear()
        storage.breaks = 3
        assert await read_all(storage, "doc.bin", start=100) == data[100:]
        assert storage.starts == [100, 700_100, 1_400_100, 2_100_100]


@pytest.mark.s3
async def test_s3_stream_that_keeps_breaking_is_transient(s3: S3Storage) -> None:
    await s3.put("doc.bin", blob(MiB))
    async with breaking(s3, breaks=99, limit=100_000, max_resumes=2) as storage:
        with pytest.raises(TransientError, match=r"'doc.bin'.*broke 3 times.*byte 300000"):
            await read_all(storage, "doc.bin")


@pytest.mark.s3
async def test_s3_object_replaced_during_a_resume_is_not_stitched(s3: S3Storage) -> None:
    await s3.put("doc.bin", blob(MiB, seed=1))

    async def replace() -> None:
        await s3.put("doc.bin", blob(MiB, seed=2))

    async with breaking(s3, breaks=1, limit=200_000, before_resume=replace) as storage:
        with pytest.raises(VersionChangedError, match=r"'doc.bin'.*replaced since it was first"):
            await read_all(storage, "doc.bin")


@pytest.mark.s3
async def test_s3_missing_key_is_permanent_and_names_the_key(s3: S3Storage) -> None:
    with pytest.raises(PermanentError, match=r"'nothing/here.txt'.*not found") as err:
        await read_all(s3, "nothing/here.txt")
    assert err.value.detail["key"] == "nothing/here.txt"
    with pytest.raises(PermanentError, match=r"'nothing/here.txt'"):
        await s3.size("nothing/here.txt")


@pytest.mark.s3
async def test_s3_missing_bucket_is_a_configuration_problem(s3_endpoint: Any) -> None:
    async with S3Storage(
        "wc-no-such-bucket",
        endpoint_url=s3_endpoint.url,
        access_key_id=s3_endpoint.access_key,
        secret_access_key=s3_endpoint.secret_key,
        max_attempts=1,
    ) as storage:
        with pytest.raises(TransientError, match="does not exist"):
            await storage.health_check()


@pytest.mark.s3
@pytest.mark.parametrize("wrong", ["access", "secret"])
async def test_s3_wrong_credentials_give_a_clear_error_without_the_secret(
    s3_endpoint: Any, s3_bucket: str, wrong: str
) -> None:
    secret = "very-secret-value-do-not-print-4711"
    access = "wc-wrong-access-key" if wrong == "access" else s3_endpoint.access_key
    storage = S3Storage(
        s3_bucket,
        endpoint_url=s3_endpoint.url,
        access_key_id=access,
        secret_access_key=secret,
        max_attempts=1,
    )
    assert secret not in repr(storage)
    async with storage:
        for call in (storage.health_check(), read_all(storage, "any.txt"), storage.put("x", b"1")):
            with pytest.raises(
                TransientError, match=r"refused.*check storage.access_key_id"
            ) as err:
                await call
            text = f"{err.value} {err.value!r} {err.value.detail} {err.value.__cause__}"
            assert secret not in text


@pytest.mark.s3
async def test_storage_from_config(s3_endpoint: Any, s3_bucket: str, tmp_path: Path) -> None:
    settings = StorageSettings(
        backend="s3",
        bucket=s3_bucket,
        prefix="/in/",
        endpoint_url=s3_endpoint.url,
        access_key_id=s3_endpoint.access_key,
        secret_access_key=s3_endpoint.secret_key,
    )
    storage = storage_from_config(settings)
    assert isinstance(storage, S3Storage)
    assert storage.prefix == "in/"
    assert s3_endpoint.secret_key not in repr(storage)
    async with storage:
        await storage.put("k", b"v")
        assert await read_all(storage, "k") == b"v"
    local = storage_from_config(StorageSettings(local_root=tmp_path))
    assert isinstance(local, LocalStorage)
    assert local.root == tmp_path
    assert os.fspath(tmp_path) in repr(local)
