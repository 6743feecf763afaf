"""DocumentWorker end to end on a real PostgreSQL, local files and a real S3 endpoint."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from worker_core import JobStatus, Queue, TransientError, WorkerConfig
from worker_core.ingest.chunker import Chunker
from worker_core.ingest.document_worker import DocumentWorker
from worker_core.ingest.embedders import HashingEmbedder
from worker_core.ingest.storage import LocalStorage, S3Storage
from worker_core.writes import ChunkWriter

PARAGRAPH = (
    "Ingestion workers claim jobs from PostgreSQL, stream documents from storage, "
    "split them into overlapping chunks and store embeddings idempotently. Ünïcødé, "
    "€uro signs and 𝄞 clefs cross stream boundaries without harm.\n\n"
)


def document(paragraphs: int, seed: int = 0) -> str:
    return "".join(f"[{seed}.{i}] {PARAGRAPH}" for i in range(paragraphs))


@pytest.fixture
def local_config(make_config: Callable[..., WorkerConfig], tmp_path: Path) -> WorkerConfig:
    return make_config(
        storage={"backend": "local", "local_root": str(tmp_path)},
        queue={"concurrency": 4},
        retry={"max_attempts": 3},
    )


async def chunk_rows(queue: Queue, document_id: str) -> list[tuple[Any, ...]]:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL(
                "SELECT chunk_index, content, embedding IS NOT NULL FROM {}.chunks "
                "WHERE document_id = %s ORDER BY chunk_index"
            ).format(sql.Identifier(queue.schema)),
            (document_id,),
        )
        return await cur.fetchall()


async def documents(queue: Queue) -> dict[str, tuple[Any, ...]]:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT document_id, storage_key, chunks, job_id FROM {}.documents").format(
                sql.Identifier(queue.schema)
            )
        )
        return {row[0]: row[1:] for row in await cur.fetchall()}


async def test_documents_are_ingested_once(
    queue: Queue, local_config: WorkerConfig, tmp_path: Path
) -> None:
    texts = {"small": "One short document.", "medium": document(20), "large": document(300, seed=1)}
    storage = LocalStorage(tmp_path, read_size=4096)  # many pieces: boundaries mid-character
    for name, text in texts.items():
        await storage.put(f"in/{name}.txt", text.encode())
    chunker = Chunker(400, 50)
    worker = DocumentWorker(
        local_config, storage=storage, chunker=chunker, batch_size=64, embed_batch_size=50
    )
    ids = [await queue.enqueue({"document_id": name, "key": f"in/{name}.txt"}) for name in texts]
    await worker.run(until_empty=True, install_signal_handlers=False)

    for job_id, (name, text) in zip(ids, texts.items(), strict=True):
        job = await queue.get(job_id)
        assert job is not None and job.status is JobStatus.SUCCEEDED, job and job.last_error
        expected = chunker.split(text)
        rows = await chunk_rows(queue, name)
        assert [(r[0], r[1]) for r in rows] == [(c.index, c.text) for c in expected]
        assert all(r[2] for r in rows)
        assert job.state["chunk_count"] == len(expected)
        assert job.state["chunks"] == {"written": len(expected), "skipped": 0}
        assert job.state["recorded"] is True
    recorded = await documents(queue)
    assert recorded["large"][:2] == ("in/large.txt", len(chunker.split(texts["large"])))
    assert worker.metrics.summary()["processed"] == 3

    # Ingesting the same document again writes nothing new, and says so.
    again = await queue.enqueue({"document_id": "large", "key": "in/large.txt"})
    await worker.run(until_empty=True, install_signal_handlers=False)
    job = await queue.get(again)
    assert job is not None and job.status is JobStatus.SUCCEEDED
    total = len(chunker.split(texts["large"]))
    assert job.state["chunks"] == {"written": 0, "skipped": total}
    assert job.state["embedded"] == 0
    assert job.state["recorded"] is False
    assert (await documents(queue))["large"][2] == ids[2]


async def test_bad_documents_are_dead_lettered_with_a_reason(
    queue: Queue, local_config: WorkerConfig, tmp_path: Path
) -> None:
    files = {
        "good.txt": b"A perfectly fine document.",
        "empty.txt": b"",
        "blank.txt": b" \n\n\t ",
        "latin1.txt": "caf\xe9 au lait".encode("latin-1"),
        "image.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        "nul.txt": b"text with a \x00 NUL byte",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cases = {
        "good": ({"document_id": "good", "key": "good.txt"}, None),
        "missing": ({"document_id": "missing", "key": "nope.txt"}, "'nope.txt' not found"),
        "empty": ({"document_id": "empty", "key": "empty.txt"}, "empty document"),
        "blank": ({"document_id": "blank", "key": "blank.txt"}, "empty document"),
        "latin1": (
            {"document_id": "latin1", "key": "latin1.txt"},
            "not valid UTF-8 (invalid continuation byte at byte offset 3)",
        ),
        "image": ({"document_id": "image", "key": "image.png"}, "not valid UTF-8"),
        "nul": ({"document_id": "nul", "key": "nul.txt"}, "NUL byte at byte offset 12"),
        "no id": ({"key": "good.txt"}, "payload field 'document_id'"),
        "escape": ({"document_id": "escape", "key": "../etc/passwd"}, "escapes the storage root"),
    }
    ids = {name: await queue.enqueue(payload) for name, (payload, _) in cases.items()}
    worker = DocumentWorker(local_config)
    await worker.run(until_empty=True, install_signal_handlers=False)
    for name, (_, reason) in cases.items():
        job = await queue.get(ids[name])
        assert job is not None
        if reason is None:
            assert job.status is JobStatus.SUCCEEDED
            continue
        assert job.status is JobStatus.DEAD, name
        assert job.attempt == 1, name  # permanent: no retries
        assert job.last_error is not None and reason in job.last_error["message"], job.last_error
    assert await chunk_rows(queue, "nul") == []


class FlakyStorage(LocalStorage):
    """Local files whose first stream breaks after ``fail_after`` bytes; records starts."""

    def __init__(self, root: Path, fail_after: int) -> None:
        super().__init__(root, read_size=1000)
        self.fail_after = fail_after
        self.starts: list[int] = []

    async def open_stream(
        self, key: str, *, start: int = 0, version: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        self.starts.append(start)
        sent = 0
        async for piece in super().open_stream(key, start=start, version=version):
            yield piece
            sent += len(piece)
            if len(self.starts) == 1 and sent >= self.fail_after:
                raise TransientError("connection dropped (test)")


async def test_chunk_stage_resumes_from_its_checkpoint(
    queue: Queue, local_config: WorkerConfig, tmp_path: Path
) -> None:
    text = document(200)
    (tmp_path / "doc.txt").write_text(text)
    storage = FlakyStorage(tmp_path, fail_after=len(text.encode()) // 2)
    chunker = Chunker(300, 30)
    worker = DocumentWorker(
        local_config, storage=storage, chunker=chunker, batch_size=10, checkpoint_every=0
    )
    job_id = await queue.enqueue({"document_id": "doc", "key": "doc.txt"})
    await worker.run(until_empty=True, install_signal_handlers=False)

    job = await queue.get(job_id)
    assert job is not None and job.status is JobStatus.SUCCEEDED
    assert job.attempt == 2
    assert len(storage.starts) == 2 and storage.starts[0] == 0
    # The retry read from the checkpointed byte offset, not from the top...
    assert 0 < storage.starts[1] <= len(text.encode()) // 2
    expected = chunker.split(text)
    # ...and the result is exactly that of an uninterrupted run, without duplicates.
    assert [(r[0], r[1]) for r in await chunk_rows(queue, "doc")] == [
        (c.index, c.text) for c in expected
    ]
    assert job.state["chunks"]["written"] == len(expected)


class FlakyEmbedder(HashingEmbedder):
    """Fails its first call, as if the worker died between chunking and embedding."""

    def __init__(self) -> None:
        super().__init__(384)
        self.calls = 0

    async def embed(self, texts: list[str]) -> list[list[float]]:
        self.calls += 1
        if self.calls == 1:
            raise TransientError("embedding service unavailable (test)")
        return await super().embed(texts)


class CountingStorage(LocalStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.streams = 0

    async def open_stream(
        self, key: str, *, start: int = 0, version: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        self.streams += 1
        async for piece in super().open_stream(key, start=start, version=version):
            yield piece


async def test_failure_between_chunk_and_embed_resumes_at_embed(
    queue: Queue, local_config: WorkerConfig, tmp_path: Path
) -> None:
    text = document(40)
    (tmp_path / "doc.txt").write_text(text)
    storage = CountingStorage(tmp_path)
    embedder = FlakyEmbedder()
    worker = DocumentWorker(local_config, storage=storage, embedder=embedder, embed_batch_size=7)
    job_id = await queue.enqueue({"document_id": "doc", "key": "doc.txt"})
    await worker.run(until_empty=True, install_signal_handlers=False)

    job = await queue.get(job_id)
    assert job is not None and job.status is JobStatus.SUCCEEDED
    assert job.attempt == 2
    assert storage.streams == 1  # the chunk stage was not repeated
    assert job.errors[0]["stage"] == "embed"
    rows = await chunk_rows(queue, "doc")
    assert len(rows) == len(Chunker().split(text)) == job.state["chunk_count"]
    assert all(r[2] for r in rows)


async def test_embedder_of_the_wrong_dimension_refuses_to_start(
    queue: Queue, local_config: WorkerConfig
) -> None:
    worker = DocumentWorker(local_config, embedder=HashingEmbedder(16))
    with pytest.raises(RuntimeError, match=r"16-dimension vectors.*stores 384"):
        await worker.run(until_empty=True, install_signal_handlers=False)


@pytest.mark.s3
async def test_ingest_from_s3(
    queue: Queue, make_config: Callable[..., WorkerConfig], s3_endpoint: Any, s3_bucket: str
) -> None:
    config = make_config(
        storage={
            "backend": "s3",
            "bucket": s3_bucket,
            "prefix": "incoming",
            "endpoint_url": s3_endpoint.url,
            "access_key_id": s3_endpoint.access_key,
            "secret_access_key": s3_endpoint.secret_key,
        }
    )
    text = document(120)
    async with S3Storage.from_settings(config.storage) as storage:
        await storage.put("a.txt", text.encode())
    worker = DocumentWorker(config)
    assert isinstance(worker.storage, S3Storage)
    ok = await queue.enqueue({"document_id": "a", "key": "a.txt"})
    missing = await queue.enqueue({"document_id": "b", "key": "b.txt"})
    await worker.run(until_empty=True, install_signal_handlers=False)
    job = await queue.get(ok)
    assert job is not None and job.status is JobStatus.SUCCEEDED
    version = job.state["pin"]["version"]
    async with S3Storage.from_settings(config.storage) as storage:
        assert version == (await storage.stat("a.txt")).version  # the ETag is the version
    async with queue.connection() as conn:
        counts = await ChunkWriter(queue.schema).counts(conn, "a", version=version)
    assert counts.chunks == counts.embedded == len(Chunker().split(text))
    dead = await queue.get(missing)
    assert dead is not None and dead.status is JobStatus.DEAD
    assert dead.last_error is not None and "'b.txt'" in dead.last_error["message"]


def test_embedder_and_storage_come_from_the_config(
    make_config: Callable[..., WorkerConfig],
) -> None:
    from worker_core.ingest.http_embedder import HttpEmbedder

    worker = DocumentWorker(
        make_config(embedding={"provider": "http", "endpoint": "http://127.0.0.1:9/v1"})
    )
    assert isinstance(worker.embedder, HttpEmbedder)
    # Jobs share the worker's breaker, so an outage defers them instead of failing them.
    assert worker.embedder.breaker is worker.breaker("embeddings")
    assert isinstance(worker.storage, LocalStorage)
    default = DocumentWorker(make_config())
    assert isinstance(default.embedder, HashingEmbedder)
    assert default.embedder.dimensions == 384
    with pytest.raises(ValueError, match="batch_size"):
        DocumentWorker(make_config(), batch_size=0)
