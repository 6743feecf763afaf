"""DocumentWorker: the reference pipeline from a stored document to embedded chunks.

Payload ``{"document_id": str, "key": str}``. Three stages hand work to each
other through the chunks buffer table, so each can resume where a crash left it:

``chunk``
    Streams the object (ranged from the checkpointed byte offset on a retry),
    splits it and writes chunks in batches through ``ChunkWriter``. After a batch
    is written its cursor goes into ``ctx.state``, persisted every
    ``checkpoint_every`` seconds: a crash repeats at most that much work, and the
    repeat writes nothing (deterministic ids, ``ON CONFLICT DO NOTHING``).
``embed``
    Reads chunks whose embedding is NULL, embeds them batch by batch and fills
    only NULL embeddings; the table is the cursor, no checkpoint is needed. No
    connection is held while the embedder works.
``finalize``
    Verifies the stored chunks against the count the chunk stage produced (no
    gaps, all embedded) and records the document in ``<schema>.documents``.

Memory is bounded by the batch size and the storage read size, not by the
document. Bad documents (missing object, empty, invalid UTF-8, binary, NUL
bytes, a payload without ``document_id``) are permanent errors with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING

from worker_core.errors import PermanentError, TransientError
from worker_core.stages import Stage, StageContext
from worker_core.worker import BaseWorker
from worker_core.writes import Chunk, ChunkWriter, TableWriter

from .chunker import ChunkCursor, Chunker, TextChunk
from .embedders import Embedder, HashingEmbedder
from .storage import Storage, storage_from_config

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from worker_core.config import EmbeddingSettings, WorkerConfig

__all__ = ["ChunkStage", "DocumentWorker", "EmbedStage", "FinalizeStage", "embedder_from_config"]


def embedder_from_config(settings: EmbeddingSettings) -> Embedder:
    """The embedder ``settings.provider`` names."""
    if settings.provider == "http":
        from .http_embedder import HttpEmbedder  # imported only when chosen (aiohttp)

        return HttpEmbedder.from_settings(settings)
    return HashingEmbedder(settings.dimensions)


def _payload(ctx: StageContext) -> tuple[str, str]:
    payload = ctx.job.payload
    values = []
    for field in ("document_id", "key"):
        value = payload.get(field)
        if not isinstance(value, str) or not value.strip():
            raise PermanentError(
                f"job {ctx.job.id}: payload field {field!r} must be a non-empty string",
                field=field,
            )
        values.append(value)
    return values[0], values[1]


class ChunkStage:
    """Stream the document and write its chunks, checkpointing the cursor."""

    name = "chunk"

    def __init__(self, worker: DocumentWorker) -> None:
        self.worker = worker

    async def run(self, ctx: StageContext) -> None:
        document_id, key = _payload(ctx)
        worker = self.worker
        cursor = ChunkCursor.from_state(ctx.state.get("chunk_cursor"))
        progress: dict[str, int] = ctx.state.setdefault("chunks", {"written": 0, "skipped": 0})
        if not cursor.done:
            if cursor.offset:
                ctx.logger.info("chunking resumes", offset=cursor.offset, index=cursor.index)
            name = f"document {document_id!r} ({key})"
            last_checkpoint = time.monotonic()
            batch: list[TextChunk] = []
            stream = worker.storage.open_stream(key, start=cursor.offset)
            async with (
                aclosing(stream),
                aclosing(worker.chunker.chunks(stream, cursor=cursor, name=name)) as chunks,
            ):
                async for piece in chunks:
                    batch.append(piece)
                    if len(batch) < worker.batch_size:
                        continue
                    cursor = await self._write(ctx, document_id, batch, progress)
                    batch = []
                    if time.monotonic() - last_checkpoint >= worker.checkpoint_every:
                        await ctx.checkpoint()
                        last_checkpoint = time.monotonic()
            if batch:
                cursor = await self._write(ctx, document_id, batch, progress)
            cursor = ChunkCursor(cursor.index, cursor.offset, True)
            ctx.state["chunk_cursor"] = cursor.to_state()
        ctx.state["chunk_count"] = cursor.index
        ctx.logger.info("document chunked", chunks=cursor.index, **progress)

    async def _write(
        self,
        ctx: StageContext,
        document_id: str,
        batch: Sequence[TextChunk],
        progress: dict[str, int],
    ) -> ChunkCursor:
        rows = [
            Chunk(document_id, c.index, c.text, metadata={"start": c.start, "end": c.end})
            for c in batch
        ]
        async with ctx.connection() as conn:
            result = await self.worker.writer.write(conn, rows)
        progress["written"] += result.inserted
        progress["skipped"] += result.skipped
        # Only now, with the batch stored, may the cursor move past it.
        cursor = batch[-1].cursor
        ctx.state["chunk_cursor"] = cursor.to_state()
        return cursor


class EmbedStage:
    """Fill the document's missing embeddings, batch by batch."""

    name = "embed"

    def __init__(self, worker: DocumentWorker) -> None:
        self.worker = worker

    async def run(self, ctx: StageContext) -> None:
        document_id, _key = _payload(ctx)
        worker = self.worker
        filled_total = 0
        after = -1
        while True:
            async with ctx.connection() as conn:
                missing = await worker.writer.missing_embeddings(
                    conn, document_id, limit=worker.embed_batch_size, after=after
                )
            if not missing:
                break
            vectors = await worker.embedder.embed([m.content for m in missing])
            if len(vectors) != len(missing):
                raise TransientError(
                    f"embedder returned {len(vectors)} vectors for {len(missing)} texts"
                )
            async with ctx.connection() as conn:
                filled_total += await worker.writer.set_embeddings(
                    conn, zip((m.id for m in missing), vectors, strict=True)
                )
            after = missing[-1].chunk_index
        ctx.state["embedded"] = ctx.state.get("embedded", 0) + filled_total
        ctx.logger.info("document embedded", filled=filled_total)


class FinalizeStage:
    """Verify the stored chunks and record the document as ingested."""

    name = "finalize"

    def __init__(self, worker: DocumentWorker) -> None:
        self.worker = worker

    async def run(self, ctx: StageContext) -> None:
        document_id, key = _payload(ctx)
        expected = ctx.state.get("chunk_count")
        if not isinstance(expected, int):
            raise PermanentError(
                f"job {ctx.job.id}: no chunk count in the job state; the chunk stage did not run"
            )
        async with ctx.connection() as conn:
            counts = await self.worker.writer.counts(conn, document_id)
            problem = None
            if counts.chunks != expected or counts.next_index != expected:
                problem = (
                    f"holds {counts.chunks} chunks (indexes up to {counts.next_index - 1}) "
                    f"but the document has {expected}; an older version of it may have been "
                    "ingested under the same document_id"
                )
            elif counts.embedded != counts.chunks:
                problem = f"has {counts.chunks - counts.embedded} chunks without an embedding"
            if problem is not None:
                raise PermanentError(
                    f"document {document_id!r}: the chunks table {problem}",
                    document_id=document_id,
                    expected=expected,
                    stored=counts.chunks,
                    embedded=counts.embedded,
                )
            recorded = await self.worker.documents.write(
                conn, [(document_id, key, expected, ctx.job.id)]
            )
        ctx.state["recorded"] = recorded.inserted == 1
        ctx.logger.info(
            "document ingested" if recorded.inserted else "document was already ingested",
            chunks=expected,
        )


class DocumentWorker(BaseWorker):
    """Ingests documents from storage into the chunks buffer table, with embeddings.

    Args:
        config: the validated configuration (storage, embedding, database schema).
        storage: a ``Storage``; by default built from ``config.storage`` and opened
            and closed with each ``run()``.
        embedder: an ``Embedder``; by default built from ``config.embedding``.
        chunker: a ``Chunker`` (``ingest.chunk_size`` / ``ingest.chunk_overlap`` by default).
        batch_size: chunks written per statement by the chunk stage
            (``ingest.batch_size`` by default).
        embed_batch_size: chunks embedded per request (``embedding.batch_size``
            by default).
        checkpoint_every: seconds between cursor checkpoints of the chunk stage
            (``ingest.checkpoint_every`` by default).
        pool: an open connection pool to share.
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        storage: Storage | None = None,
        embedder: Embedder | None = None,
        chunker: Chunker | None = None,
        batch_size: int | None = None,
        embed_batch_size: int | None = None,
        checkpoint_every: float | None = None,
        pool: AsyncConnectionPool | None = None,
    ) -> None:
        super().__init__(config, pool=pool)
        ingest = config.ingest
        batch_size = ingest.batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.storage: Storage = (
            storage if storage is not None else storage_from_config(config.storage)
        )
        if embedder is None:
            embedder = embedder_from_config(config.embedding)
            if getattr(embedder, "breaker", False) is None:
                # Every job shares the worker's breaker: an outage opens it once and
                # jobs are deferred instead of each burning its attempts.
                embedder.breaker = self.breaker("embeddings")  # type: ignore[attr-defined]
                # ... and while it is open, claiming pauses: a job claimed now would
                # only be deferred again.
                self.required_breakers = ("embeddings",)
        self.embedder = embedder
        self.chunker = chunker or Chunker(ingest.chunk_size, ingest.chunk_overlap)
        self.batch_size = batch_size
        self.embed_batch_size = embed_batch_size or config.embedding.batch_size
        self.checkpoint_every = (
            ingest.checkpoint_every if checkpoint_every is None else checkpoint_every
        )
        schema = config.database.schema
        self.writer = ChunkWriter(schema, dimensions=config.embedding.dimensions)
        self.documents = TableWriter(
            "documents",
            ("document_id", "storage_key", "chunks", "job_id"),
            schema=schema,
            conflict=("document_id",),
        )
        self.add_health_check("storage", self.storage.health_check)

    def stages(self) -> list[Stage]:
        return [ChunkStage(self), EmbedStage(self), FinalizeStage(self)]

    async def on_startup(self) -> None:
        """Open storage and refuse to start if the embedder cannot fill the column."""
        await self.storage.open()
        try:
            async with self.connection() as conn:
                column = await self.writer.embedding_column(conn)
            if column.dimensions is not None and column.dimensions != self.embedder.dimensions:
                raise RuntimeError(
                    f"the embedder makes {self.embedder.dimensions}-dimension vectors but "
                    f"{self.config.database.schema}.chunks stores {column.dimensions}"
                )
        except BaseException:
            await self.storage.aclose()  # on_shutdown does not run when startup fails
            raise

    async def on_shutdown(self) -> None:
        await self.storage.aclose()
        close = getattr(self.embedder, "aclose", None)
        if close is not None:
            await close()
