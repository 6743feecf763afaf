"""The embedding service misbehaves in phases while DocumentWorker ingests through
HttpEmbedder: it fails (500), hangs, answers 429 with Retry-After, answers slowly,
then recovers. No job may be dead-lettered because of it, the breaker must bound
the calls that reach the failing service, and everything completes afterwards."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from worker_core import JobStatus, Queue, WorkerConfig
from worker_core.ingest import DocumentWorker
from worker_core.testing import running, wait_for

DIMENSIONS = 384
PHASES = [("ok", 0.2), ("fail", 2.0), ("hang", 1.5), ("ratelimit", 1.5), ("slow", 1.5)]


class EmbeddingService:
    """An OpenAI-compatible /v1/embeddings endpoint whose behaviour can be switched."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.calls: Counter[str] = Counter()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        mode = self.mode
        self.calls[mode] += 1
        body = await request.json()
        if mode == "fail":
            return web.json_response({"error": "boom"}, status=500)
        if mode == "hang":
            await asyncio.sleep(30)  # longer than the client's timeout
        if mode == "ratelimit":
            return web.json_response({"error": "slow down"}, status=429,
                                     headers={"Retry-After": "1"})  # fmt: skip
        if mode == "slow":
            await asyncio.sleep(0.3)
        data = [{"index": i, "embedding": [((i + len(t)) % 7) / 7.0] * DIMENSIONS}
                for i, t in enumerate(body["input"])]  # fmt: skip
        return web.json_response({"data": data, "model": body.get("model")})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/embeddings", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.mark.timeout(180)
async def test_service_faults_defer_jobs_and_everything_completes(
    make_config: Callable[..., WorkerConfig], queue: Queue, tmp_path: Path
) -> None:
    service = EmbeddingService()
    await service.start()
    storage = tmp_path / "docs"
    storage.mkdir()
    documents = 600
    for i in range(documents):
        (storage / f"d{i}.txt").write_text(f"document {i} " + "lorem ipsum dolor " * 200)
    config = make_config(
        queue={"name": "docs", "concurrency": 2, "lease_seconds": 10, "heartbeat_seconds": 2},
        retry={"base_delay": 0.05, "max_delay": 0.5, "max_attempts": 3},
        circuit_breaker={"fail_max": 3, "reset_timeout": 0.5},
        storage={"backend": "local", "local_root": str(storage)},
        embedding={"provider": "http", "endpoint": service.url, "api_key": "sk-test-faults",
                   "dimensions": DIMENSIONS, "batch_size": 32, "timeout": 0.5},
    )  # fmt: skip
    ids = await queue.enqueue_many(
        [{"document_id": f"doc-{i}", "key": f"d{i}.txt"} for i in range(documents)], queue="docs"
    )
    worker = DocumentWorker(config)
    phase_log: list[tuple[str, float]] = []
    started = time.monotonic()
    try:
        async with running(worker):
            for mode, seconds in PHASES:
                service.mode = mode
                phase_log.append((mode, time.monotonic() - started))
                await asyncio.sleep(seconds)  # the phases are wall-clock by nature
            service.mode = "ok"
            await wait_for(lambda: _finished(queue, len(ids)), timeout=120, interval=0.2,
                           what="every document ingested after recovery")  # fmt: skip
    finally:
        await service.stop()
    stats = await queue.stats("docs")
    summary: dict[str, Any] = worker.metrics.summary()
    print(f"\n[external faults] documents={documents} calls_by_phase={dict(service.calls)} "
          f"succeeded={stats['succeeded']} dead={stats['dead']} deferred={summary['deferred']} "
          f"retried={summary['retried']} elapsed={time.monotonic() - started:.1f}s")  # fmt: skip
    assert stats["succeeded"] == documents
    assert stats["dead"] == 0
    assert summary["deferred"] > 0  # the outage deferred jobs instead of failing them
    # While failing for 2 s: fail_max calls, one trial per 0.5 s reset, and at most
    # the calls already in flight on the other slots.
    assert service.calls["fail"] <= 3 + 2.0 / 0.5 + 2, service.calls
    for job_id in ids[:5]:
        job = await queue.get(job_id)
        assert job is not None
        assert job.status is JobStatus.SUCCEEDED
        assert job.attempt <= 3


async def _finished(queue: Queue, n: int) -> bool:
    return (await queue.stats("docs"))["succeeded"] == n
