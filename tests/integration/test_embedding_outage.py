"""Graceful degradation with a real local embedding service that goes down and comes back,
and fallback endpoints of the same model. Real PostgreSQL, real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from psycopg import sql

from worker_core import JobStatus, Queue, WorkerConfig
from worker_core.breaker import CircuitBreaker, CircuitState
from worker_core.config import EmbeddingSettings
from worker_core.errors import CircuitOpenError, TransientError
from worker_core.ingest.document_worker import DocumentWorker
from worker_core.ingest.http_embedder import HttpEmbedder
from worker_core.testing import running, wait_for

DIMENSIONS = 384
MODEL = "test-embed-1"


class EmbeddingService:
    """An OpenAI-compatible endpoint that can fail (500), answer as another model,
    or be stopped and started again on the same port (a real outage)."""

    def __init__(self, model: str = MODEL) -> None:
        self.model = model
        self.mode = "ok"
        self.calls = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.json()
        if self.mode == "fail":
            return web.json_response({"error": "boom"}, status=500)
        data = [{"index": i, "embedding": [(len(t) % 5 + 1) / 5.0] * DIMENSIONS}
                for i, t in enumerate(body["input"])]  # fmt: skip
        return web.json_response({"data": data, "model": self.model})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/embeddings", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def services() -> AsyncIterator[Callable[..., Any]]:
    started: list[EmbeddingService] = []

    async def make(model: str = MODEL) -> EmbeddingService:
        service = EmbeddingService(model)
        await service.start()
        started.append(service)
        return service

    yield make
    for service in started:
        await service.stop()


def write_docs(root: Path, names: range) -> None:
    for i in names:
        (root / f"d{i}.txt").write_text(f"[d{i}] " + f"searchable words of document {i}. " * 60)


async def query(queue: Queue, text: str, *args: Any) -> list[tuple[Any, ...]]:
    async with queue.connection() as conn:
        cur = await conn.execute(sql.SQL(text).format(s=sql.Identifier(queue.schema)), args or None)
        return await cur.fetchall()


@pytest.mark.timeout(120)
async def test_finalize_pending_during_an_outage_then_the_backfill(
    queue: Queue, make_config: Callable[..., WorkerConfig], tmp_path: Path, services: Any
) -> None:
    service = await services()
    config = make_config(
        storage={"backend": "local", "local_root": str(tmp_path)},
        queue={"concurrency": 2},
        retry={"max_attempts": 5},
        circuit_breaker={"fail_max": 2, "reset_timeout": 0.3},
        embedding={"provider": "http", "endpoint": service.url, "model": MODEL,
                   "dimensions": DIMENSIONS, "batch_size": 16, "timeout": 0.5},
        ingest={"on_embedding_outage": "finalize_pending", "backfill_interval": 0.2},
    )  # fmt: skip
    write_docs(tmp_path, range(8))
    worker = DocumentWorker(config)
    assert worker.required_breakers == ()  # documents keep flowing while the circuit is open
    before = await queue.enqueue_many(
        [{"document_id": f"doc-{i}", "key": f"d{i}.txt"} for i in range(2)]
    )
    async with running(worker):
        await wait_for(lambda: all_succeeded(queue, before), timeout=30, what="first documents")
        await service.stop()  # the service goes down: connections are refused
        during = await queue.enqueue_many(
            [{"document_id": f"doc-{i}", "key": f"d{i}.txt"} for i in range(2, 8)]
        )
        await wait_for(lambda: all_succeeded(queue, during), timeout=30, what="outage documents")
        pending = await query(
            queue, "SELECT document_id FROM {s}.documents WHERE embeddings_pending ORDER BY 1"
        )
        assert [r[0] for r in pending] == [f"doc-{i}" for i in range(2, 8)]
        # Searchable by text meanwhile, without vectors.
        hits = await query(queue, "SELECT count(*), count(embedding) FROM {s}.current_chunks "
                                  "WHERE content LIKE %s", "[d5]%")  # fmt: skip
        assert hits[0][0] > 0 and hits[0][1] == 0
        for job_id in during:
            job = await queue.get(job_id)
            assert job is not None and job.state["embeddings_pending"] is True
            assert job.state["outcome"] == "ingested"
        await service.start()  # back on the same port: the backfill fills what waited
        await wait_for(lambda: nothing_pending(queue), timeout=30, what="backfill complete")
    counts = await query(queue, "SELECT count(*), count(embedding), array_agg(DISTINCT embedding_model) "
                                "FROM {s}.current_chunks")  # fmt: skip
    assert counts[0][0] == counts[0][1] > 0 and counts[0][2] == [MODEL]
    stats = await queue.stats()
    assert stats["dead"] == 0 and stats["queued"] == stats["running"] == 0
    backfills = await query(queue, "SELECT count(*) FROM {s}.jobs WHERE payload ? 'backfill' "
                                   "AND status = 'succeeded'")  # fmt: skip
    assert backfills[0][0] >= 6
    assert worker.outcomes["embeddings_pending"] == 6


async def all_succeeded(queue: Queue, ids: list[int]) -> bool:
    for job_id in ids:
        job = await queue.get(job_id)
        if job is None or job.status is not JobStatus.SUCCEEDED:
            return False
    return True


async def nothing_pending(queue: Queue) -> bool:
    rows = await query(
        queue,
        "SELECT (SELECT count(*) FROM {s}.documents WHERE embeddings_pending) + "
        "(SELECT count(*) FROM {s}.current_chunks WHERE embedding IS NULL)",
    )
    return bool(rows[0][0] == 0)


async def test_claiming_pauses_only_when_no_other_endpoint_can_serve(
    make_config: Callable[..., WorkerConfig], services: Any
) -> None:
    service = await services()
    config = make_config(embedding={"provider": "http", "endpoint": service.url})
    worker = DocumentWorker(config)
    assert worker.required_breakers == ("embeddings",)
    with_fallback = DocumentWorker(
        make_config(
            embedding={
                "provider": "http",
                "endpoint": service.url,
                "fallback_endpoints": [service.url + "/"],
            }
        )
    )
    assert with_fallback.required_breakers == ()  # another endpoint may serve
    assert [b.name for b in with_fallback.embedding_breakers] == [
        "embeddings", "embeddings-fallback-1",
    ]  # fmt: skip


@pytest.mark.timeout(60)
async def test_fallback_endpoints_serve_while_the_primary_is_open(
    queue: Queue, make_config: Callable[..., WorkerConfig], tmp_path: Path, services: Any
) -> None:
    primary, fallback = await services(), await services()
    primary.mode = "fail"
    config = make_config(
        storage={"backend": "local", "local_root": str(tmp_path)},
        queue={"concurrency": 2},
        retry={"max_attempts": 5},
        circuit_breaker={"fail_max": 2, "reset_timeout": 60},
        embedding={"provider": "http", "endpoint": primary.url, "model": MODEL,
                   "fallback_endpoints": [fallback.url], "dimensions": DIMENSIONS,
                   "batch_size": 16, "timeout": 2},
    )  # fmt: skip
    write_docs(tmp_path, range(6))
    ids = await queue.enqueue_many(
        [{"document_id": f"doc-{i}", "key": f"d{i}.txt"} for i in range(6)]
    )
    worker = DocumentWorker(config)
    await worker.run(until_empty=True, install_signal_handlers=False)
    assert await all_succeeded(queue, ids)
    assert worker.breaker("embeddings").state is CircuitState.OPEN
    # Only the calls that opened the primary's breaker (and any already in flight) reached it.
    assert 2 <= primary.calls <= 2 + 2
    assert fallback.calls > 0
    counts = await query(queue, "SELECT count(*), count(embedding), array_agg(DISTINCT embedding_model) "
                                "FROM {s}.current_chunks")  # fmt: skip
    assert counts[0][0] == counts[0][1] > 0 and counts[0][2] == [MODEL]


async def test_http_embedder_tries_endpoints_in_order_and_refuses_other_models(
    services: Any,
) -> None:
    primary, same, other = await services(), await services(), await services("other-model")
    breakers: dict[str, CircuitBreaker] = {}

    def breaker(name: str) -> CircuitBreaker:
        return breakers.setdefault(name, CircuitBreaker(name, fail_max=1, reset_timeout=60))

    settings = EmbeddingSettings(provider="http", endpoint=primary.url, model=MODEL, dimensions=DIMENSIONS,
                                 fallback_endpoints=[other.url, same.url])  # fmt: skip
    embedder = HttpEmbedder(settings, breakers=breaker)
    try:
        assert len(await embedder.embed(["a", "bb"])) == 2
        assert (primary.calls, other.calls, same.calls) == (1, 0, 0)
        primary.mode = "fail"
        with pytest.raises(TransientError, match="HTTP 500"):
            await embedder.embed(["a"])
        assert breakers["embeddings"].state is CircuitState.OPEN
        # The first fallback serves another model: its vectors are refused...
        with pytest.raises(TransientError, match="answered with model 'other-model'"):
            await embedder.embed(["a"])
        assert breakers["embeddings-fallback-1"].state is CircuitState.OPEN
        # ...and the next endpoint of the same model serves.
        assert len(await embedder.embed(["a", "bb", "ccc"])) == 3
        assert same.calls == 1 and primary.calls == 2 and other.calls == 1
        same.mode = "fail"
        with pytest.raises(TransientError):
            await embedder.embed(["a"])
        with pytest.raises(CircuitOpenError) as refused:  # every endpoint is out
            await embedder.embed(["a"])
        assert 0 < (refused.value.retry_after or 0) <= 60
        assert same.calls == 2 and primary.calls == 2
    finally:
        await embedder.aclose()
    await asyncio.sleep(0)
