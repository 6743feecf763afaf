"""Changed, unchanged and deleted documents on a real PostgreSQL, local files and S3.

A document replaced between a failed read and its retry ends with chunks of one
version only; a new version replaces the old one atomically for readers of
``current_chunks``; an unchanged version writes nothing; deletes are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import pytest
from psycopg import AsyncConnection, sql

from worker_core import JobStatus, Queue, TransientError, WorkerConfig
from worker_core.ingest.chunker import Chunker
from worker_core.ingest.document_worker import DocumentWorker
from worker_core.ingest.storage import LocalStorage, ObjectInfo, S3Storage
from worker_core.testing import wait_for

PARAGRAPH = (
    "Ingestion workers claim jobs from PostgreSQL, stream documents from storage and "
    "split them into overlapping chunks. Ünïcødé and 𝄞 clefs cross stream boundaries.\n\n"
)


def text(paragraphs: int, tag: str) -> str:
    return "".join(f"[{tag}.{i}] {PARAGRAPH}" for i in range(paragraphs))


@pytest.fixture
def local_config(make_config: Callable[..., WorkerConfig], tmp_path: Path) -> WorkerConfig:
    return make_config(
        storage={"backend": "local", "local_root": str(tmp_path)},
        queue={"concurrency": 2},
        retry={"max_attempts": 3},
    )


async def rows(queue: Queue, document_id: str, table: str = "chunks") -> list[tuple[Any, ...]]:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL(
                "SELECT version, chunk_index, content, embedding IS NOT NULL FROM {}.{} "
                "WHERE document_id = %s ORDER BY version, chunk_index"
            ).format(sql.Identifier(queue.schema), sql.Identifier(table)),
            (document_id,),
        )
        return await cur.fetchall()


async def document_row(queue: Queue, document_id: str) -> tuple[Any, ...] | None:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL(
                "SELECT version, chunks, deleted_at IS NOT NULL, embeddings_pending "
                "FROM {}.documents WHERE document_id = %s"
            ).format(sql.Identifier(queue.schema)),
            (document_id,),
        )
        return await cur.fetchone()


async def ingest(queue: Queue, worker: DocumentWorker, payload: dict[str, Any]) -> Any:
    job_id = await queue.enqueue(payload)
    await worker.run(until_empty=True, install_signal_handlers=False)
    job = await queue.get(job_id)
    assert job is not None
    return job


# -- a document replaced between a failed read and its retry ---------------------------
class ReplacedMidRead(LocalStorage):
    """The first read breaks half-way, and the file is replaced before the retry."""

    def __init__(self, root: Path, replacement: bytes) -> None:
        super().__init__(root, read_size=997)
        self.replacement = replacement
        self.starts: list[int] = []

    async def open_stream(
        self, key: str, *, start: int = 0, version: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        self.starts.append(start)
        first = len(self.starts) == 1
        size = (await self.stat(key)).size
        sent = 0
        async for piece in super().open_stream(key, start=start, version=version):
            yield piece
            sent += len(piece)
            if first and sent >= size // 2:
                await self.put(key, self.replacement)
                raise TransientError("connection dropped (test)")


async def test_local_document_replaced_mid_read_ends_with_one_version(
    queue: Queue, local_config: WorkerConfig, tmp_path: Path
) -> None:
    old, new = text(80, "v1"), text(60, "v2")
    (tmp_path / "doc.txt").write_text(old)
    storage = ReplacedMidRead(tmp_path, new.encode())
    chunker = Chunker(300, 30)
    worker = DocumentWorker(
        local_config, storage=storage, chunker=chunker, batch_size=5, checkpoint_every=0
    )
    job = await ingest(queue, worker, {"document_id": "doc", "key": "doc.txt"})
    assert job.status is JobStatus.SUCCEEDED, job.last_error
    assert job.attempt == 2
    # The retry checked the version, found another and started over at byte 0...
    assert storage.starts == [0, 0]
    assert job.state["restarts"] == 1 and job.state["discarded"] > 0
    # ...so the table holds the new version's chunks and nothing of the old one.
    version = (await storage.stat("doc.txt")).version
    expected = [(version, c.index, c.text, True) for c in chunker.split(new)]
    assert await rows(queue, "doc") == expected
    assert await rows(queue, "doc", "current_chunks") == expected
    assert await document_row(queue, "doc") == (version, len(expected), False, False)
    assert job.state["outcome"] == "ingested"


class ReplacedMidReadS3(S3Storage):
    """S3: the first read breaks half-way and the object is replaced before the retry;
    with ``stale_stat`` the retry's version check still sees the old ETag (the object
    changes between the check and the read), so If-Match must catch it."""

    replacement = b""
    stale: ObjectInfo | None = None
    stale_stat = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.starts: list[int] = []

    async def stat(self, key: str) -> ObjectInfo:
        if self.stale_stat and self.stale is not None and len(self.starts) == 1:
            return self.stale
        return await super().stat(key)

    async def open_stream(
        self, key: str, *, start: int = 0, version: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        self.starts.append(start)
        first = len(self.starts) == 1
        if first:
            self.stale = await super().stat(key)
        sent = 0
        async for piece in super().open_stream(key, start=start, version=version):
            yield piece
            sent += len(piece)
            if first and self.stale is not None and sent >= self.stale.size // 2:
                await self.put(key, self.replacement)
                raise TransientError("connection dropped (test)")


@pytest.mark.s3
@pytest.mark.parametrize("stale_stat", [False, True], ids=["version-check", "if-match"])
async def test_s3_document_replaced_mid_read_ends_with_one_version(
    queue: Queue,
    make_config: Callable[..., WorkerConfig],
    s3_endpoint: Any,
    s3_bucket: str,
    stale_stat: bool,
) -> None:
    config = make_config(retry={"max_attempts": 3})
    old, new = text(80, "v1"), text(60, "v2")
    storage = ReplacedMidReadS3(
        s3_bucket,
        endpoint_url=s3_endpoint.url,
        access_key_id=s3_endpoint.access_key,
        secret_access_key=s3_endpoint.secret_key,
        read_size=1024,
    )
    storage.replacement, storage.stale_stat = new.encode(), stale_stat
    async with storage:
        await storage.put("doc.txt", old.encode())
        chunker = Chunker(300, 30)
        worker = DocumentWorker(
            config, storage=storage, chunker=chunker, batch_size=5, checkpoint_every=0
        )
        job = await ingest(queue, worker, {"document_id": "doc", "key": "doc.txt"})
        await storage.open()  # the worker closed it on its way out
        version = (await storage.stat("doc.txt")).version
    assert job.status is JobStatus.SUCCEEDED, job.last_error
    assert job.state["restarts"] == 1 and job.state["discarded"] > 0
    if stale_stat:  # the ranged read went out pinned to the old ETag and was refused
        assert storage.starts[:2] == [0, storage.starts[1]] and storage.starts[1] > 0
        assert storage.starts[2] == 0
    else:
        assert storage.starts == [0, 0]
    expected = [(version, c.index, c.text, True) for c in chunker.split(new)]
    assert await rows(queue, "doc") == expected


# -- a new version replaces the old one atomically ------------------------------------
async def test_changed_document_switches_atomically_for_readers(
    queue: Queue, local_config: WorkerConfig, tmp_path: Path, pg_dsn: str
) -> None:
    chunker = Chunker(250, 25)
    storage = LocalStorage(tmp_path)
    worker = DocumentWorker(local_config, storage=storage, chunker=chunker, batch_size=7)
    old, new = text(150, "v1"), text(110, "v2")
    await storage.put("doc.txt", old.encode())
    first = await ingest(queue, worker, {"document_id": "doc", "key": "doc.txt"})
    assert first.state["outcome"] == "ingested"
    v1 = (await storage.stat("doc.txt")).version
    n1, n2 = len(chunker.split(old)), len(chunker.split(new))
    assert n1 != n2

    seen: list[tuple[str, int, int]] = []
    stop = asyncio.Event()

    async def reader() -> None:
        query = sql.SQL(
            "SELECT version, count(*), count(embedding) FROM {}.current_chunks "
            "WHERE document_id = 'doc' GROUP BY version"
        ).format(sql.Identifier(queue.schema))
        async with await AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            while not stop.is_set() or len(seen) < 3:
                cur = await conn.execute(query)
                found = await cur.fetchall()
                assert len(found) == 1, f"readers saw {found}"  # one version, never none
                seen.append(found[0])

    task = asyncio.create_task(reader())
    # The reader has seen version 1 before version 2 is ingested.
    await wait_for(lambda: bool(seen) or task.done(), what="the reader's first read")
    await storage.put("doc.txt", new.encode())
    v2 = (await storage.stat("doc.txt")).version
    second = await ingest(queue, worker, {"document_id": "doc", "key": "doc.txt"})
    stop.set()
    await task
    assert second.status is JobStatus.SUCCEEDED
    assert second.state["outcome"] == "replaced" and second.state["replaced"] == n1
    # Complete sets only: all of version 1 (embedded), then all of version 2.
    assert set(seen) == {(v1, n1, n1), (v2, n2, n2)}
    assert seen[0][0] == v1 and seen[-1][0] == v2
    assert {r[0] for r in await rows(queue, "doc")} == {v2}  # the old chunks are gone


# -- an unchanged version writes nothing -----------------------------------------------
class CountingStorage(LocalStorage):
    streams = 0

    async def open_stream(
        self, key: str, *, start: int = 0, version: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        self.streams += 1
        async for piece in super().open_stream(key, start=start, version=version):
            yield piece


async def table_versions(queue: Queue) -> list[tuple[Any, ...]]:
    """Every row of chunks and documents with its row version (xmin)."""
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL(
                "SELECT id::text, xmin::text FROM {s}.chunks UNION ALL "
                "SELECT document_id, xmin::text FROM {s}.documents ORDER BY 1"
            ).format(s=sql.Identifier(queue.schema))
        )
        return await cur.fetchall()


async def test_unchanged_version_writes_nothing_and_says_so(
    queue: Queue, local_config: WorkerConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="worker_core")
    storage = CountingStorage(tmp_path)
    await storage.put("doc.txt", text(40, "v1").encode())
    worker = DocumentWorker(local_config, storage=storage)
    first = await ingest(queue, worker, {"document_id": "doc", "key": "doc.txt"})
    before = await table_versions(queue)
    streams = storage.streams
    again = await ingest(queue, worker, {"document_id": "doc", "key": "doc.txt"})
    assert again.status is JobStatus.SUCCEEDED
    assert again.state["outcome"] == "unchanged" and again.state["recorded"] is False
    assert again.state["chunks"] == {"written": 0, "skipped": first.state["chunk_count"]}
    assert again.state["embedded"] == 0
    assert storage.streams == streams  # the version was enough: the object was not read
    assert await table_versions(queue) == before  # not one row written
    assert worker.outcomes["unchanged"] == 1 and worker.outcomes["ingested"] == 1
    assert any("document unchanged: nothing written" in r.getMessage() for r in caplog.records)


# -- deletes ------------------------------------------------------------------------------
async def test_deletes_are_idempotent_and_a_deleted_document_can_return(
    queue: Queue, local_config: WorkerConfig, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    await storage.put("a.txt", text(30, "a").encode())
    worker = DocumentWorker(local_config, storage=storage)
    ingested = await ingest(queue, worker, {"document_id": "a", "key": "a.txt"})
    count = ingested.state["chunk_count"]
    version = ingested.state["pin"]["version"]

    deleted = await ingest(queue, worker, {"document_id": "a", "delete": True})
    assert deleted.status is JobStatus.SUCCEEDED
    assert (deleted.state["outcome"], deleted.state["deleted_chunks"]) == ("deleted", count)
    assert await rows(queue, "a") == [] and await rows(queue, "a", "current_chunks") == []
    assert await document_row(queue, "a") == (version, 0, True, False)

    again = await ingest(queue, worker, {"document_id": "a", "delete": True, "key": "a.txt"})
    assert (again.state["outcome"], again.state["deleted_chunks"]) == ("already_deleted", 0)
    ghost = await ingest(queue, worker, {"document_id": "ghost", "delete": True})
    assert ghost.state["outcome"] == "not_ingested"
    assert (await document_row(queue, "ghost") or ())[2] is True  # a tombstone

    # The same, unchanged file again: deleted documents are ingested anew.
    back = await ingest(queue, worker, {"document_id": "a", "key": "a.txt"})
    assert back.state["outcome"] == "ingested"
    assert len(await rows(queue, "a", "current_chunks")) == count

    bad = await ingest(queue, worker, {"document_id": "a", "delete": "yes"})
    assert bad.status is JobStatus.DEAD
    assert (
        bad.last_error is not None and "'delete' must be true or false" in bad.last_error["message"]
    )
    both = await ingest(queue, worker, {"document_id": "a", "delete": True, "backfill": True})
    assert both.status is JobStatus.DEAD


async def test_a_read_pinned_before_a_newer_one_is_superseded(
    queue: Queue, local_config: WorkerConfig
) -> None:
    from worker_core.ingest.catalog import DocumentCatalog
    from worker_core.writes import Chunk, ChunkWriter

    writer = ChunkWriter(queue.schema, dimensions=384)
    catalog = DocumentCatalog(queue.schema, writer)
    async with queue.connection() as conn:
        old_pin, _ = await catalog.pin(conn, "doc")
        new_pin, _ = await catalog.pin(conn, "doc")
        for version in ("old", "new"):
            await writer.write(
                conn, [Chunk("doc", i, f"{version} {i}", version=version) for i in range(3)]
            )
        args: dict[str, Any] = {"document_id": "doc", "storage_key": "doc.txt", "chunks": 3, "job_id": None,
                "allow_pending": True}  # fmt: skip
        done = await catalog.finalize(conn, version="new", pinned_at=new_pin, **args)
        assert done.outcome == "ingested" and done.embeddings_pending
        late = await catalog.finalize(conn, version="old", pinned_at=old_pin, **args)
        assert late.outcome == "superseded"
        # A delete supersedes every read that began before it.
        assert (await catalog.delete(conn, "doc"))[0] == "deleted"
        after = await catalog.finalize(conn, version="new", pinned_at=new_pin, **args)
        assert after.outcome == "superseded"
    assert await rows(queue, "doc") == []
    row = await document_row(queue, "doc")
    assert row is not None and row[2] is True


async def test_a_gap_in_the_chunks_is_a_permanent_error(
    queue: Queue, local_config: WorkerConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker_core.ingest.pipeline import FinalizeStage

    storage = LocalStorage(tmp_path)
    await storage.put("doc.txt", text(30, "v1").encode())
    original = FinalizeStage.run

    async def lose_a_chunk_first(self: FinalizeStage, ctx: Any) -> None:
        async with ctx.connection() as conn:
            await conn.execute(
                sql.SQL("DELETE FROM {}.chunks WHERE chunk_index = 1").format(
                    sql.Identifier(queue.schema)
                )
            )
        await original(self, ctx)

    monkeypatch.setattr(FinalizeStage, "run", lose_a_chunk_first)
    job = await ingest(queue, DocumentWorker(local_config, storage=storage),
                       {"document_id": "doc", "key": "doc.txt"})  # fmt: skip
    assert job.status is JobStatus.DEAD
    assert job.last_error is not None and "the chunks table holds" in job.last_error["message"]
    assert await document_row(queue, "doc") is None  # never made current


class MemoryStorage:
    """A user's Storage without versions (no stat, no listing): versions are content
    hashes. Its first read breaks half-way and the object is replaced before the retry."""

    def __init__(self, objects: dict[str, bytes], replacement: bytes) -> None:
        self.objects = objects
        self.replacement = replacement
        self.reads: list[int] = []

    async def open_stream(self, key: str, *, start: int = 0) -> AsyncGenerator[bytes, None]:
        self.reads.append(start)
        data = self.objects[key]
        for at in range(start, len(data), 500):
            yield data[at : at + 500]
            if len(self.reads) == 2 and at >= len(data) // 2:  # reads[0] pinned the hash
                self.objects[key] = self.replacement
                raise TransientError("connection dropped (test)")

    async def size(self, key: str) -> int:
        return len(self.objects[key])

    async def exists(self, key: str) -> bool:
        return key in self.objects

    async def put(self, key: str, data: Any) -> None:
        self.objects[key] = bytes(data)

    async def health_check(self) -> None:
        return None

    async def open(self) -> MemoryStorage:
        return self

    async def aclose(self) -> None:
        return None


async def test_storage_without_versions_is_pinned_by_content_hash(
    queue: Queue, local_config: WorkerConfig
) -> None:
    import hashlib

    from worker_core.ingest.storage import Storage, VersionedStorage

    old, new = text(60, "v1").encode(), text(40, "v2").encode()
    storage = MemoryStorage({"doc.txt": old}, new)
    assert isinstance(storage, Storage) and not isinstance(storage, VersionedStorage)
    chunker = Chunker(300, 30)
    worker = DocumentWorker(
        local_config, storage=storage, chunker=chunker, batch_size=5, checkpoint_every=0
    )
    job = await ingest(queue, worker, {"document_id": "doc", "key": "doc.txt"})
    assert job.status is JobStatus.SUCCEEDED, job.last_error
    version = "sha256:" + hashlib.sha256(new).hexdigest()
    assert job.state["pin"]["version"] == version and job.state["restarts"] == 1
    expected = [(version, c.index, c.text, True) for c in chunker.split(new.decode())]
    assert await rows(queue, "doc") == expected
    again = await ingest(queue, worker, {"document_id": "doc", "key": "doc.txt"})
    assert again.state["outcome"] == "unchanged"
