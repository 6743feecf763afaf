"""ServiceClient and HttpEmbedder against a real local aiohttp server."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web

from worker_core.breaker import CircuitBreaker, CircuitState
from worker_core.config import EmbeddingSettings
from worker_core.errors import (
    CircuitOpenError,
    PermanentError,
    RetryableError,
    TransientError,
)
from worker_core.http import ServiceClient
from worker_core.ingest.http_embedder import HttpEmbedder
from worker_core.logs import job_context
from worker_core.ratelimit import TokenBucket

API_KEY = "sk-test-0123456789abcdef"


@dataclass
class FakeService:
    """A switchable service: ok, fail (500), 429/503 with Retry-After, 400, or hang."""

    mode: str = "ok"
    retry_after: str | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    dimensions: int = 4
    hanging: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
        headers = {"Retry-After": self.retry_after} if self.retry_after else {}
        if self.mode == "hang":
            self.hanging.set()
            await asyncio.Event().wait()
        if self.mode == "fail":
            return web.Response(status=500, text="internal error")
        if self.mode in ("429", "503"):
            return web.Response(status=int(self.mode), text="slow down", headers=headers)
        if self.mode == "400":
            # A careless service that echoes the credentials back.
            auth = request.headers.get("Authorization", "")
            return web.Response(status=400, text=f"bad request (you sent {auth})")
        if request.path.endswith("/embeddings"):
            texts = json.loads(body)["input"]
            data = [
                {"index": i, "embedding": [float(len(t)), float(i), 0.5, 1.0][: self.dimensions]}
                for i, t in enumerate(texts)
            ]
            data.reverse()  # the API may answer in any order; index says which is which
            return web.json_response({"object": "list", "data": data})
        return web.json_response({"ok": True})


@pytest.fixture
async def service() -> AsyncIterator[FakeService]:
    fake = FakeService()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.url = f"http://{host}:{port}"
    yield fake
    await runner.cleanup()


@pytest.fixture
async def make_client(
    service: FakeService,
) -> AsyncIterator[Callable[..., ServiceClient]]:
    clients: list[ServiceClient] = []

    def make(**kw: Any) -> ServiceClient:
        kw.setdefault("headers", {"Authorization": f"Bearer {API_KEY}"})
        client = ServiceClient("svc", service.url, **kw)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def test_success_and_correlation_header(
    service: FakeService, make_client: Callable[..., ServiceClient]
) -> None:
    client = make_client()
    response = await client.request("POST", "/echo", json={"a": 1}, correlation_id="corr-1")
    assert response.status == 200 and response.json() == {"ok": True}
    sent = service.requests[-1]["headers"]
    assert sent["X-Correlation-ID"] == "corr-1"
    assert sent["Authorization"] == f"Bearer {API_KEY}"
    with job_context(correlation_id="from-the-job"):
        await client.request("GET", "/echo")
    assert service.requests[-1]["headers"]["X-Correlation-ID"] == "from-the-job"


async def test_5xx_is_transient_and_opens_the_breaker(
    service: FakeService, make_client: Callable[..., ServiceClient]
) -> None:
    breaker = CircuitBreaker("svc", fail_max=5, reset_timeout=60)
    client = make_client(breaker=breaker)
    service.mode = "fail"
    for _ in range(5):
        with pytest.raises(TransientError) as info:
            await client.request("GET", "/things?api_key=abc123")
        assert info.value.detail["status"] == 500
        assert "abc123" not in str(info.value)
    assert_state(breaker, CircuitState.OPEN)
    with pytest.raises(CircuitOpenError):
        await client.request("GET", "/things")
    assert len(service.requests) == 5  # the refused call never left the process


async def test_retry_after_becomes_retryable_and_is_not_a_breaker_failure(
    service: FakeService, make_client: Callable[..., ServiceClient]
) -> None:
    breaker = CircuitBreaker("svc", fail_max=1)
    client = make_client(breaker=breaker, max_retry_after=120)
    service.mode, service.retry_after = "429", "7"
    with pytest.raises(RetryableError) as info:
        await client.request("GET", "/")
    assert info.value.retry_after == 7.0 and info.value.detail["status"] == 429
    service.retry_after = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    with pytest.raises(RetryableError) as info:
        await client.request("GET", "/")
    assert info.value.retry_after is not None and 25 <= info.value.retry_after <= 30
    service.retry_after = "86400"
    with pytest.raises(RetryableError) as info:
        await client.request("GET", "/")
    assert info.value.retry_after == 120.0  # clamped
    service.mode = "503"
    with pytest.raises(RetryableError) as info:
        await client.request("GET", "/")
    assert info.value.retry_after == 120.0
    service.mode, service.retry_after = "429", None
    with pytest.raises(RetryableError) as info:
        await client.request("GET", "/")
    assert info.value.retry_after is None
    assert_state(breaker, CircuitState.CLOSED)
    assert breaker.failure_count == 0
    service.mode = "503"  # a 503 without Retry-After is an outage
    with pytest.raises(TransientError):
        await client.request("GET", "/")
    assert_state(breaker, CircuitState.OPEN)


async def test_4xx_is_permanent_and_never_leaks_the_key(
    service: FakeService,
    make_client: Callable[..., ServiceClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    breaker = CircuitBreaker("svc", fail_max=1)
    client = make_client(breaker=breaker)
    service.mode = "400"
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            with pytest.raises(PermanentError) as info:
                await client.request("POST", "/x", json={})
    assert "HTTP 400" in str(info.value) and "bad request" in str(info.value)
    assert_state(breaker, CircuitState.CLOSED)
    for text in (
        str(info.value),
        repr(info.value),
        repr(client),
        caplog.text,
        str(info.value.detail),
    ):
        assert API_KEY not in text


async def test_a_hung_service_times_out_inside_the_breaker(
    service: FakeService, make_client: Callable[..., ServiceClient]
) -> None:
    breaker = CircuitBreaker("svc", fail_max=1)
    client = make_client(breaker=breaker, timeout=0.2)
    service.mode = "hang"
    with pytest.raises(TransientError, match=r"timed out after 0\.2s"):
        await client.request("GET", "/slow")
    assert service.hanging.is_set()
    assert_state(breaker, CircuitState.OPEN)  # the timeout counted as a failure


async def test_connection_errors_are_transient(make_client: Callable[..., ServiceClient]) -> None:
    client = ServiceClient("svc", "http://127.0.0.1:9", timeout=5)
    try:
        with pytest.raises(TransientError, match="svc: GET /"):
            await client.request("GET", "/")
    finally:
        await client.close()


async def test_rate_limiter_is_taken_before_each_request(
    service: FakeService, make_client: Callable[..., ServiceClient]
) -> None:
    bucket = TokenBucket(0.001, 2, name="svc")
    client = make_client(rate_limiter=bucket, max_rate_wait=0.0)
    await client.request("GET", "/")
    await client.request("GET", "/")
    with pytest.raises(RetryableError, match="rate limit"):
        await client.request("GET", "/")
    assert len(service.requests) == 2


def embedding_settings(service: FakeService, **kw: Any) -> EmbeddingSettings:
    return EmbeddingSettings(
        provider="http",
        endpoint=service.url,
        api_key=API_KEY,
        model="test-model",
        dimensions=4,
        batch_size=2,
        timeout=5,
        **kw,
    )


async def test_http_embedder_batches_and_keeps_order(service: FakeService) -> None:
    breaker = CircuitBreaker("embeddings")
    async with HttpEmbedder(
        embedding_settings(service, requests_per_second=1000), breaker=breaker
    ) as embedder:
        texts = ["a", "bb", "ccc", "dddd", "eeeee"]
        vectors = await embedder.embed(texts)
        assert await embedder.embed([]) == []
    assert vectors == [[float(len(t)), float(i % 2), 0.5, 1.0] for i, t in enumerate(texts)]
    bodies = [json.loads(r["body"]) for r in service.requests]
    assert [b["input"] for b in bodies] == [["a", "bb"], ["ccc", "dddd"], ["eeeee"]]
    assert all(b["model"] == "test-model" and b["dimensions"] == 4 for b in bodies)
    assert {r["path"] for r in service.requests} == {"/v1/embeddings"}
    assert service.requests[0]["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert API_KEY not in repr(embedder)


async def test_http_embedder_checks_the_vectors(service: FakeService) -> None:
    service.dimensions = 3
    async with HttpEmbedder(embedding_settings(service)) as embedder:
        with pytest.raises(PermanentError, match="has 3 values, expected 4"):
            await embedder.embed(["a", "b"])
        service.mode = "fail"
        with pytest.raises(TransientError):
            await embedder.embed(["a"])


async def test_an_outage_defers_jobs_and_all_succeed_after_recovery(
    service: FakeService, make_config: Callable[..., Any], queue: Any
) -> None:
    from worker_core import BaseWorker, StageContext

    class CallService:
        name = "call"

        def __init__(self, worker: OutageWorker) -> None:
            self.worker = worker

        async def run(self, ctx: StageContext) -> None:
            assert self.worker.client is not None
            await self.worker.client.request("POST", "/work", json={"job": ctx.job.id})

    class OutageWorker(BaseWorker):
        client: ServiceClient | None = None

        def stages(self) -> list[Any]:
            return [CallService(self)]

        async def on_startup(self) -> None:
            self.client = ServiceClient("svc", service.url, breaker=self.breaker("svc"), timeout=5)

        async def on_shutdown(self) -> None:
            assert self.client is not None
            await self.client.close()

    config = make_config(
        queue={"concurrency": 2},
        circuit_breaker={"fail_max": 2, "reset_timeout": 0.1},
    )
    worker = OutageWorker(config)

    def recover(name: str, old: CircuitState, new: CircuitState) -> None:
        if new is CircuitState.OPEN:
            service.mode = "ok"  # the service comes back while the circuit is open

    worker.breaker("svc").add_listener(recover)
    service.mode = "fail"
    await queue.enqueue_many([{"n": i} for i in range(10)])
    await asyncio.wait_for(worker.run(until_empty=True, install_signal_handlers=False), 60)
    stats = await queue.stats()
    assert stats["succeeded"] == 10 and stats["dead"] == 0
    summary = worker.metrics.summary()
    assert summary["dead_lettered"] == 0 and summary["deferred"] >= 1
    failed_calls = len(service.requests) - 10
    # fail_max calls reached the dead service, plus at most one already in flight on
    # the other slot when the circuit opened; none after that.
    assert 2 <= failed_calls <= 3
    assert worker.breaker("svc").state is CircuitState.CLOSED


def assert_state(breaker: CircuitBreaker, expected: CircuitState) -> None:
    # A helper, not `assert breaker.state is X` inline: mypy narrows the property at
    # the first assert and reads the next one, after a call, as unreachable.
    assert breaker.state is expected, breaker.snapshot()
