"""DocumentWorker: the reference pipeline from a stored document to embedded chunks.

Stages (``pipeline.py``): ``chunk`` pins the object's version and writes its
chunks, ``embed`` fills their embeddings, ``finalize`` switches the document to
the new version in one transaction. Payloads: ``{"document_id", "key"}`` to
ingest, ``{"document_id", "delete": true}`` to delete. Readers query the
``<schema>.current_chunks`` view: one complete version per document.

Memory is bounded by the batch size and the storage read size, not by the
document. Bad documents (missing object, empty, invalid UTF-8, binary, NUL
bytes, a payload without ``document_id``) are permanent errors with the reason.

Embedding outages: with ``ingest.on_embedding_outage = "defer"`` (the default)
a document that meets an open embeddings circuit is deferred, and claiming
pauses while the circuit is open. With ``"finalize_pending"`` it is finalized
without the missing vectors (searchable by text, ``documents.embeddings_pending``)
and the worker's backfill loop enqueues ``{"document_id", "backfill": true}``
jobs for such documents whenever an embedding breaker is not open: every
``ingest.backfill_interval`` seconds and at once when one closes.
``embedding.fallback_endpoints`` give the HTTP embedder further endpoints of the
same model, each behind its own breaker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from worker_core.breaker import CircuitBreaker, CircuitState
from worker_core.logs import StructuredLogger
from worker_core.queue import Queue
from worker_core.stages import Stage
from worker_core.worker import BaseWorker
from worker_core.writes import ChunkWriter

from .catalog import DocumentCatalog, dedupe_key
from .chunker import Chunker
from .embedders import Embedder, HashingEmbedder
from .pipeline import ChunkStage, EmbedStage, FinalizeStage
from .storage import Storage, storage_from_config

if TYPE_CHECKING:
    from collections.abc import Callable

    from psycopg_pool import AsyncConnectionPool

    from worker_core.config import EmbeddingSettings, WorkerConfig

__all__ = [
    "ChunkStage",
    "DocumentWorker",
    "EmbedStage",
    "FinalizeStage",
    "embedder_from_config",
]

_log = StructuredLogger("worker_core.ingest")


def embedder_from_config(
    settings: EmbeddingSettings, *, breakers: Callable[[str], CircuitBreaker] | None = None
) -> Embedder:
    """The embedder ``settings.provider`` names; ``breakers`` gives each HTTP endpoint
    its breaker (e.g. ``worker.breaker``)."""
    if settings.provider == "http":
        from .http_embedder import HttpEmbedder  # imported only when chosen (aiohttp)

        return HttpEmbedder.from_settings(settings, breakers=breakers)
    return HashingEmbedder(settings.dimensions)


@runtime_checkable
class _Guarded(Protocol):
    """An embedder behind circuit breakers (HttpEmbedder): one per endpoint."""

    @property
    def breakers(self) -> list[CircuitBreaker]: ...


class DocumentWorker(BaseWorker):
    """Ingests documents from storage into the chunks table, with embeddings.

    Args:
        config: the validated configuration (storage, embedding, ingest, database schema).
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

    ``outcomes`` counts what this worker's jobs did to their documents
    (``ingested``, ``replaced``, ``unchanged``, ``superseded``, ``deleted``, ...).
    A subclass that overrides ``on_startup`` or ``on_shutdown`` calls ``super()``:
    they open storage and run the embeddings backfill loop.
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
            # Every job shares the worker's breakers: an outage opens them once and
            # jobs are deferred (or finalized pending) instead of each burning attempts.
            embedder = embedder_from_config(config.embedding, breakers=self.breaker)
        self.embedder = embedder
        #: The breakers of the embedding endpoints, primary first.
        self.embedding_breakers = list(embedder.breakers) if isinstance(embedder, _Guarded) else []
        model = getattr(embedder, "model", None)
        #: Stored with every vector; vectors of another model count as missing.
        self.embedding_model: str = (
            model if isinstance(model, str) and model else type(embedder).__qualname__
        )
        self.finalize_pending = ingest.on_embedding_outage == "finalize_pending"
        if len(self.embedding_breakers) == 1 and not self.finalize_pending:
            # While the only endpoint's circuit is open a claimed job would only be
            # deferred again: claiming pauses. (With fallbacks another endpoint may
            # serve; with finalize_pending documents still get chunked.)
            self.required_breakers = (self.embedding_breakers[0].name,)
        self.chunker = chunker or Chunker(ingest.chunk_size, ingest.chunk_overlap)
        self.batch_size = batch_size
        self.embed_batch_size = embed_batch_size or config.embedding.batch_size
        self.checkpoint_every = (
            ingest.checkpoint_every if checkpoint_every is None else checkpoint_every
        )
        schema = config.database.schema
        self.writer = ChunkWriter(schema, dimensions=config.embedding.dimensions)
        self.catalog = DocumentCatalog(schema, self.writer)
        self.outcomes: collections.Counter[str] = collections.Counter()
        self._backfill_task: asyncio.Task[None] | None = None
        self._backfill_wake = asyncio.Event()
        self.add_health_check("storage", self.storage.health_check)

    def stages(self) -> list[Stage]:
        return [ChunkStage(self), EmbedStage(self), FinalizeStage(self)]

    async def on_startup(self) -> None:
        """Open storage, refuse to start if the embedder cannot fill the column, and
        start the embeddings backfill loop."""
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
        for breaker in self.embedding_breakers:
            breaker.add_listener(self._breaker_changed)
        self._backfill_wake.set()  # a first sweep at start: pending work from before
        self._backfill_task = asyncio.create_task(
            self._backfill_loop(), name="worker_core.ingest.backfill"
        )

    async def on_shutdown(self) -> None:
        task, self._backfill_task = self._backfill_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for breaker in self.embedding_breakers:
            breaker.remove_listener(self._breaker_changed)
        await self.storage.aclose()
        close = getattr(self.embedder, "aclose", None)
        if close is not None:
            await close()

    # -- the embeddings backfill ------------------------------------------------------
    def embeddings_available(self) -> bool:
        """Whether some embedding endpoint's breaker may admit a call now."""
        return not self.embedding_breakers or any(
            b.state is not CircuitState.OPEN for b in self.embedding_breakers
        )

    async def backfill_pending(self, *, batch_size: int = 1000) -> int:
        """Enqueue a backfill job for every document awaiting embeddings; how many were
        offered (deduplicated: one job per document and version while it waits)."""
        offered = 0
        after = ""
        queue = Queue(self.config)  # never opened: it writes on the worker's connection
        while True:
            async with self.connection() as conn:
                rows = await self.catalog.pending(conn, after=after, limit=batch_size)
                if not rows:
                    return offered
                await queue.enqueue_many(
                    [{"document_id": document_id, "backfill": True} for document_id, _ in rows],
                    dedupe_keys=[dedupe_key("backfill", d, v) for d, v in rows],
                    connection=conn,
                )
            offered += len(rows)
            after = rows[-1][0]

    def _breaker_changed(self, name: str, old: CircuitState, new: CircuitState) -> None:
        if new is CircuitState.CLOSED:
            self._backfill_wake.set()  # the service is back: fill what waited for it

    async def _backfill_loop(self) -> None:
        interval = self.config.ingest.backfill_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._backfill_wake.wait()
            self._backfill_wake.clear()
            if not self.embeddings_available():
                continue
            try:
                offered = await self.backfill_pending()
            except Exception as exc:  # the database may be away a moment: next sweep
                _log.warning("embeddings backfill sweep failed", error=repr(exc))
                continue
            if offered:
                _log.info("embeddings backfill enqueued", documents=offered)
