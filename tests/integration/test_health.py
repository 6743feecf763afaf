"""Health checks, the HTTP endpoints and the log lines of a worker, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import psycopg
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from worker_core import BaseWorker, Queue, StageContext, WorkerConfig
from worker_core.breaker import CircuitBreaker
from worker_core.health import (
    ComponentHealth,
    HealthReport,
    HealthStatus,
    HealthThresholds,
    check_database,
    check_worker,
    health_report_for_config,
)
from worker_core.logs import StructuredLogger, configure_logging, unconfigure_logging
from worker_core.metrics import ProcessingMetrics
from worker_core.server import HealthServer
from worker_core.snapshot import HealthCheck, WorkerSnapshot
from worker_core.testing import running

PASSWORD = "Health-S3cret-pw"
MISSING_SOCKET = f"postgresql://ingest:{PASSWORD}@/postgres?host=/nonexistent/wc-health-socket"


class FakeWorker:
    """A ``WorkerView`` whose state a test sets field by field; health and metrics
    read it only through ``snapshot()``, as they read a BaseWorker."""

    def __init__(self, config: WorkerConfig, queue: Queue | None) -> None:
        now = time.monotonic()
        self.config = config
        self.queue = queue
        self.worker_id = "test-host:1:abc123"
        self.metrics = ProcessingMetrics(config.queue.primary)
        self.logger = StructuredLogger("worker_core.worker", worker_id=self.worker_id)
        self.breakers: dict[str, CircuitBreaker] = {}
        self.health_checks: dict[str, HealthCheck] = {}
        self.is_running = True
        self.is_draining = False
        self.started_at: float | None = now
        self.last_loop_at: float | None = now
        self.last_claim_at: float | None = now
        self.in_flight = 0
        self.listener_connected = True

    def add_health_check(self, name: str, check: HealthCheck) -> None:
        self.health_checks[name] = check

    def snapshot(self) -> WorkerSnapshot:
        return WorkerSnapshot(
            self.worker_id,
            running=self.is_running,
            draining=self.is_draining,
            started_at=self.started_at,
            last_loop_at=self.last_loop_at,
            last_claim_at=self.last_claim_at,
            in_flight=self.in_flight,
            concurrency=self.config.queue.concurrency,
            listener_connected=self.listener_connected,
            queue=self.queue,
            breakers=self.breakers,
            health_checks=self.health_checks,
        )


def assert_no_secret(report: HealthReport) -> None:
    text = json.dumps(report.to_dict())
    assert PASSWORD not in text


async def fail() -> None:
    raise ConnectionError("service down")


# -- check_worker ---------------------------------------------------------------------
async def test_healthy_with_the_database_reachable(queue: Queue, config: WorkerConfig) -> None:
    worker = FakeWorker(config, queue)
    report = await check_worker(worker)
    assert report.status is HealthStatus.HEALTHY, report.to_dict()
    assert set(report.components) == {"database", "worker"}
    database = report.components["database"].to_dict()
    assert database["latency_ms"] is not None and database["latency_ms"] >= 0
    assert (
        database["detail"]["dead_tuples"] >= 0
        and "oldest_transaction_seconds" in database["detail"]
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert data["status"] == "healthy" and data["worker_id"] == worker.worker_id


async def test_unreachable_socket_is_unhealthy_at_once(
    make_config: Callable[..., WorkerConfig],
) -> None:
    config = make_config(database={"dsn": MISSING_SOCKET}, health={"database_timeout": 2.0})
    worker = FakeWorker(config, None)
    started = time.monotonic()
    report = await check_worker(worker)
    assert time.monotonic() - started < 2.0
    assert report.status is HealthStatus.UNHEALTHY
    assert report.components["database"].status is HealthStatus.UNHEALTHY
    assert "No such file" in report.components["database"].detail["error"]
    assert_no_secret(report)


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers (a hung database)."""
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        release.set()
        server.close()
        await server.wait_closed()


async def test_a_hung_database_is_unhealthy_within_the_timeout(
    make_config: Callable[..., WorkerConfig], silent_server: int
) -> None:
    dsn = f"postgresql://ingest:{PASSWORD}@127.0.0.1:{silent_server}/postgres"
    config = make_config(database={"dsn": dsn}, health={"database_timeout": 0.2})
    started = time.monotonic()
    report = await health_report_for_config(config)
    elapsed = time.monotonic() - started
    assert 0.15 < elapsed < 0.9, elapsed  # bounded by our timeout, not libpq's 1 s minimum
    assert report.status is HealthStatus.UNHEALTHY
    assert report.components["database"].detail["error"] == "no answer within 0.2s"
    assert_no_secret(report)


async def test_a_pool_that_cannot_connect_is_unhealthy_within_the_timeout(
    make_config: Callable[..., WorkerConfig],
) -> None:
    config = make_config(database={"dsn": MISSING_SOCKET}, health={"database_timeout": 0.3})
    pool = AsyncConnectionPool(MISSING_SOCKET, min_size=1, open=False, kwargs={"autocommit": True})
    await pool.open(wait=False)
    try:
        started = time.monotonic()
        result = await check_database(config, Queue(config, pool=pool))
        assert time.monotonic() - started < 1.0
    finally:
        await pool.close()
    assert result.status is HealthStatus.UNHEALTHY
    assert PASSWORD not in json.dumps(result.to_dict())


async def test_an_open_breaker_degrades(queue: Queue, config: WorkerConfig) -> None:
    worker = FakeWorker(config, queue)
    now = [100.0]
    embed = CircuitBreaker("embed", fail_max=1, reset_timeout=30, clock=lambda: now[0])
    worker.breakers = {"embed": embed, "s3": CircuitBreaker("s3")}
    with pytest.raises(ConnectionError):
        await embed.call(fail)
    report = await check_worker(worker)
    assert report.status is HealthStatus.DEGRADED
    assert report.components["breaker:embed"].status is HealthStatus.DEGRADED
    assert report.components["breaker:embed"].detail["state"] == "open"
    assert report.components["breaker:s3"].status is HealthStatus.HEALTHY
    now[0] += 31  # half-open: still probing, still degraded
    report = await check_worker(worker)
    assert report.components["breaker:embed"].detail["state"] == "half_open"
    assert report.status is HealthStatus.DEGRADED


async def test_user_checks_and_storage(queue: Queue, config: WorkerConfig) -> None:
    worker = FakeWorker(config, queue)
    never = asyncio.Event()

    async def slow() -> None:
        await never.wait()

    async def leaky() -> None:
        raise RuntimeError(f"cannot reach postgresql://u:{PASSWORD}@h/db")

    async def degraded() -> ComponentHealth:
        return ComponentHealth(HealthStatus.DEGRADED, None, {"lag": 3})

    class Storage:
        async def health_check(self) -> None:
            return None

    worker.add_health_check("storage", Storage().health_check)  # as DocumentWorker does
    worker.add_health_check("ok", lambda: asyncio.sleep(0))
    worker.add_health_check("stats", lambda: asyncio.sleep(0, result={"rows": 3}))
    worker.add_health_check("lagging", degraded)
    worker.add_health_check("database", lambda: asyncio.sleep(0, result=True))  # no override
    report = await check_worker(worker)
    assert report.status is HealthStatus.DEGRADED
    assert report.components["storage"].status is HealthStatus.HEALTHY
    assert report.components["stats"].detail == {"rows": 3}
    assert report.components["lagging"].latency_ms is not None
    assert report.components["check:database"].status is HealthStatus.HEALTHY

    worker.add_health_check("slow", slow)
    worker.add_health_check("leaky", leaky)
    worker.add_health_check("false", lambda: asyncio.sleep(0, result=False))
    started = time.monotonic()
    report = await check_worker(worker, thresholds=HealthThresholds(check_timeout=0.05))
    assert time.monotonic() - started < 1.0
    assert report.status is HealthStatus.UNHEALTHY
    assert report.components["slow"].detail == {"error": "no answer within 0.05s"}
    assert report.components["leaky"].detail["error"].startswith("RuntimeError: cannot reach")
    assert report.components["false"].status is HealthStatus.UNHEALTHY
    assert_no_secret(report)


async def test_worker_loop_states(queue: Queue, config: WorkerConfig) -> None:
    worker = FakeWorker(config, queue)
    now = time.monotonic()
    thresholds = HealthThresholds(loop_stall_seconds=60, listener_grace_seconds=30)

    async def status(at: float) -> tuple[HealthStatus, dict[str, Any]]:
        report = await check_worker(worker, thresholds=thresholds, clock=lambda: at)
        component = report.components["worker"]
        return component.status, component.detail

    assert (await status(now + 1))[0] is HealthStatus.HEALTHY
    stuck, detail = await status(now + 61)
    assert stuck is HealthStatus.UNHEALTHY and "stuck" in detail["problem"]
    worker.listener_connected = False
    assert (await status(now + 31))[0] is HealthStatus.DEGRADED
    worker.is_draining = True
    assert (await status(now + 100))[0] is HealthStatus.DEGRADED  # draining: no stall check
    worker.is_running = False
    assert (await status(now))[0] is HealthStatus.UNHEALTHY


async def test_database_hygiene_degrades(queue: Queue, config: WorkerConfig, pg_dsn: str) -> None:
    worker = FakeWorker(config, queue)
    await queue.enqueue_many([{"i": i} for i in range(300)])
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(sql.SQL("DELETE FROM {}.jobs").format(sql.Identifier(queue.schema)))
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await conn.execute("SELECT 1")  # the flush happens when this backend goes idle
    bloat = HealthThresholds(max_dead_tuples=100, max_dead_ratio=0.5)
    report = await check_worker(worker, thresholds=bloat)
    database = report.components["database"]
    assert database.status is HealthStatus.DEGRADED, database.detail
    assert database.detail["dead_tuples"] >= 300
    assert "dead tuples" in database.detail["problems"][0]

    async with await psycopg.AsyncConnection.connect(pg_dsn) as idle_in_transaction:
        await idle_in_transaction.execute("SELECT txid_current()")
        long_tx = HealthThresholds(max_transaction_seconds=0.0)
        report = await check_worker(worker, thresholds=long_tx)
        problems = report.components["database"].detail["problems"]
        assert any("holds back vacuum" in p for p in problems)
        assert report.status is HealthStatus.DEGRADED


async def test_report_for_config(
    queue: Queue, config: WorkerConfig, make_config: Callable[..., WorkerConfig]
) -> None:
    await queue.enqueue({"a": 1})
    report = await health_report_for_config(config)
    assert report.status is HealthStatus.HEALTHY, report.to_dict()
    assert report.components["queue"].detail["ready"] == 1
    assert report.components["database"].detail["connect_ms"] >= 0
    bare = make_config(database={"schema": "never_migrated_here"})
    report = await health_report_for_config(bare)
    assert report.status is HealthStatus.UNHEALTHY  # no jobs table: no worker can run
    assert "worker-core migrate" in report.components["database"].detail["problems"][0]


# -- HTTP -----------------------------------------------------------------------------
async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


async def test_http_server_binds_loopback_unless_told(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    worker = FakeWorker(make_config(), queue)
    async with HealthServer(worker, port=0) as server:
        assert [host for host, _ in server.addresses] == ["127.0.0.1"]
    assert WorkerConfig().health.http_host == "127.0.0.1"
    configured = make_config(health={"http_host": "0.0.0.0"})
    async with HealthServer(FakeWorker(configured, queue), host="0.0.0.0", port=0) as server:
        assert [host for host, _ in server.addresses] == ["0.0.0.0"]


async def test_http_endpoints(queue: Queue, config: WorkerConfig) -> None:
    worker = FakeWorker(config, queue)
    worker.metrics.job_succeeded(0.1)
    await queue.enqueue({"a": 1})
    async with HealthServer(worker, port=0) as server, aiohttp.ClientSession() as session:
        base = server.url
        assert (await get(session, f"{base}/healthz"))[0] == 200
        assert (await get(session, f"{base}/readyz"))[0] == 200
        status, body = await get(session, f"{base}/health")
        assert status == 200 and json.loads(body)["status"] == "healthy"
        status, text = await get(session, f"{base}/metrics")
        assert status == 200
        found = {f.name: f for f in text_string_to_metric_families(text)}
        ready = [s for s in found["worker_core_queue_jobs"].samples if s.labels["state"] == "ready"]
        assert ready[0].value == 1
        assert found["worker_core_database_up"].samples[0].value == 1
        assert "worker_core_queue_oldest_ready_age_seconds" in found
        assert "worker_core_pool_size" in found and "worker_core_jobs_table_dead_tuples" in found

        worker.is_draining = True
        assert (await get(session, f"{base}/readyz"))[0] == 503
        assert (await get(session, f"{base}/healthz"))[0] == 200  # draining is alive
        worker.is_draining = False
        worker.started_at = worker.last_loop_at = time.monotonic() - 3600
        assert (await get(session, f"{base}/healthz"))[0] == 503
        status, body = await get(session, f"{base}/health")
        assert status == 503 and json.loads(body)["status"] == "unhealthy"
        assert (await get(session, f"{base}/nope"))[0] == 404
    with pytest.raises(RuntimeError):
        _ = HealthServer(worker).port


async def test_readyz_is_503_when_the_database_is_unreachable(
    make_config: Callable[..., WorkerConfig],
) -> None:
    config = make_config(database={"dsn": MISSING_SOCKET}, health={"database_timeout": 0.5})
    worker = FakeWorker(config, None)
    async with HealthServer(worker, port=0) as server, aiohttp.ClientSession() as session:
        status, body = await get(session, f"{server.url}/readyz")
        assert status == 503 and json.loads(body)["reason"] == "database unreachable"
        assert PASSWORD not in body
        status, text = await get(session, f"{server.url}/metrics")
        assert status == 200 and PASSWORD not in text
        assert "worker_core_queue_jobs" not in text  # no stale or invented numbers


async def test_metrics_through_a_registry(queue: Queue, config: WorkerConfig) -> None:
    registry = CollectorRegistry()
    worker = FakeWorker(config, queue)
    worker.metrics.attempt_failed("TimeoutError", 0.2, "retried")
    async with (
        HealthServer(worker, port=0, registry=registry) as server,
        aiohttp.ClientSession() as session,
    ):
        status, text = await get(session, f"{server.url}/metrics")
    assert status == 200
    found = {f.name: f for f in text_string_to_metric_families(text)}
    assert found["worker_core_attempt_errors"].samples[0].labels["error_type"] == "TimeoutError"
    assert "worker_core_queue_jobs" in found


# -- a real worker ------------------------------------------------------------------------
class Parse:
    name = "parse"

    async def run(self, ctx: StageContext) -> None:
        ctx.logger.info("parsed", words=len(ctx.job.payload["text"].split()))
        logging.getLogger("thirdparty.client").info("fetched %s", ctx.job.payload["text"][:5])


class Count:
    name = "count"

    async def run(self, ctx: StageContext) -> None:
        ctx.state["n"] = 1
        ctx.logger.debug("counted")


class WordWorker(BaseWorker):
    def stages(self) -> list[Any]:
        return [Parse(), Count()]


async def test_every_line_of_a_worker_run_is_json_with_job_context(
    queue: Queue, config: WorkerConfig
) -> None:
    ids = await queue.enqueue_many([{"text": f"doc {i} words"} for i in range(6)])
    correlation = {job_id: (await queue.get(job_id)).correlation_id for job_id in ids}  # type: ignore[union-attr]
    out = io.StringIO()
    root = logging.getLogger()
    level = root.level
    configure_logging("DEBUG", stream=out, secrets=config.secrets())
    try:
        await WordWorker(config).run(until_empty=True, install_signal_handlers=False)
    finally:
        unconfigure_logging()
        root.setLevel(level)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert records
    in_stages = [
        r
        for r in records
        if r["event"] in ("parsed", "counted") or r["logger"] == "thirdparty.client"
    ]
    assert len(in_stages) == 18
    for record in in_stages:
        assert record["correlation_id"] == correlation[record["job_id"]]
        assert record["stage"] in ("parse", "count")
        assert record["queue"] == config.queue.name and record["attempt"] == 1
        assert "worker_id" in record
    for record in records:
        assert list(record)[:4] == ["timestamp", "level", "logger", "event"]
        if "job_id" in record and record["logger"] != "worker_core.worker":
            assert record["correlation_id"] == correlation[record["job_id"]]
    succeeded = [r for r in records if r["event"] == "job succeeded"]
    assert sorted(r["job_id"] for r in succeeded) == sorted(ids)


async def test_a_running_worker_serves_health(
    make_config: Callable[..., WorkerConfig], queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker_core.health

    started: list[HealthServer] = []
    ready = asyncio.Event()

    class Recording(HealthServer):
        async def start(self) -> None:
            await super().start()
            started.append(self)
            ready.set()

    monkeypatch.setattr(worker_core.health, "HealthServer", Recording, raising=False)
    config = make_config(health={"http_port": 0})  # no host: loopback only (issue 12)
    worker = WordWorker(config)
    async with running(worker), aiohttp.ClientSession() as session:
        await asyncio.wait_for(ready.wait(), 10)
        assert [host for host, _ in started[0].addresses] == ["127.0.0.1"]
        base = started[0].url
        assert (await get(session, f"{base}/healthz"))[0] == 200
        assert (await get(session, f"{base}/readyz"))[0] == 200
        status, text = await get(session, f"{base}/metrics")
        assert status == 200
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {"worker_core_jobs", "worker_core_queue_jobs", "worker_core_pool_size"} <= names
        report = await worker.health()
        assert report.status is HealthStatus.HEALTHY, report.to_dict()
        assert report.components["worker"].detail["running"] is True
    report = await worker.health()
    assert report.status is HealthStatus.UNHEALTHY  # stopped
