"""Fleet-wide breaker state on a real PostgreSQL: two registries play two workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from psycopg import sql

from worker_core.breaker import BreakerRegistry, CircuitBreaker, CircuitState
from worker_core.config import CircuitBreakerSettings
from worker_core.errors import CircuitOpenError
from worker_core.queue import Queue


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


class Service:
    def __init__(self, *, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self) -> str:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionError("service down")
        return "ok"


class Worker:
    """One worker's view: its own clock and registry on the shared schema."""

    def __init__(self, settings: CircuitBreakerSettings) -> None:
        self.clock = FakeClock()
        self.registry = BreakerRegistry(settings, clock=self.clock)

    def breaker(self) -> CircuitBreaker:
        return self.registry.get("embeddings")

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds


@pytest.fixture
async def workers(queue: Queue) -> AsyncIterator[tuple[Worker, Worker]]:
    settings = CircuitBreakerSettings(fail_max=5, reset_timeout=60)
    a, b = Worker(settings), Worker(settings)
    await a.registry.attach(queue)
    await b.registry.attach(queue)
    yield a, b
    await a.registry.detach()
    await b.registry.detach()


async def row(queue: Queue) -> dict[str, Any]:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL(
                "SELECT state, failures, trial_owner, reopen_at > now() AS waiting "
                "FROM {}.breakers WHERE name = 'embeddings'"
            ).format(sql.Identifier(queue.schema))
        )
        found = await cur.fetchone()
        assert found is not None and cur.description is not None
        return dict(zip([c.name for c in cur.description], found, strict=True))


async def reset_elapses(queue: Queue, *workers: Worker) -> None:
    """The reset timeout passes: on every worker's clock and on the database clock."""
    for worker in workers:
        worker.advance(60)
    async with queue.connection() as conn:
        await conn.execute(
            sql.SQL(
                "UPDATE {}.breakers SET reopen_at = now() - interval '1 millisecond' "
                "WHERE state = 'open'"
            ).format(sql.Identifier(queue.schema))
        )


async def fail(breaker: CircuitBreaker, n: int) -> None:
    service = Service(fail=True)
    for _ in range(n):
        with pytest.raises(ConnectionError):
            await breaker.call(service)


async def test_one_worker_trips_and_the_other_refuses_without_calling(
    queue: Queue, workers: tuple[Worker, Worker]
) -> None:
    a, b = workers
    assert await b.breaker().call(Service()) == "ok"
    await fail(a.breaker(), 5)
    assert a.breaker().state is CircuitState.OPEN
    assert (await row(queue))["state"] == "open"
    b.advance(1)  # b's cached read is older than sync_interval now
    service = Service()
    with pytest.raises(CircuitOpenError) as info:
        await b.breaker().call(service)
    assert service.calls == 0
    assert b.breaker().state is CircuitState.OPEN
    assert info.value.retry_after is not None and 55 < info.value.retry_after <= 60


async def test_failures_are_counted_across_the_fleet(
    queue: Queue, workers: tuple[Worker, Worker]
) -> None:
    a, b = workers
    await fail(a.breaker(), 3)
    await fail(b.breaker(), 2)  # the fleet's 5th failure trips it, though b saw only 2
    assert b.breaker().state is CircuitState.OPEN
    service = Service()
    with pytest.raises(CircuitOpenError):
        await a.breaker().call(service)  # a re-reads at once while it has seen failures
    assert service.calls == 0
    assert (await row(queue))["state"] == "open"


async def test_a_success_anywhere_resets_the_fleet_streak(
    queue: Queue, workers: tuple[Worker, Worker]
) -> None:
    a, b = workers
    await fail(a.breaker(), 4)
    b.advance(1)
    assert await b.breaker().call(Service()) == "ok"
    assert (await row(queue))["failures"] == 0
    await fail(a.breaker(), 1)
    assert a.breaker().state is CircuitState.CLOSED


async def test_exactly_one_trial_fleet_wide_after_the_reset(
    queue: Queue, workers: tuple[Worker, Worker]
) -> None:
    a, b = workers
    await fail(a.breaker(), 5)
    b.advance(1)
    with pytest.raises(CircuitOpenError):
        await b.breaker().call(Service())
    await reset_elapses(queue, a, b)
    service = Service()
    service.gate = asyncio.Event()
    tasks = [asyncio.create_task(w.breaker().call(service)) for w in (a, b) * 5]
    await service.entered.wait()
    pending = set(tasks)
    async with asyncio.timeout(10):  # every caller but the trial is refused, after a round trip
        while len(pending) > 1:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    done = [t for t in tasks if t.done()]
    assert service.calls == 1
    assert sum(isinstance(t.exception(), CircuitOpenError) for t in done) == 9
    assert (await row(queue))["trial_owner"] is not None
    service.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results.count("ok") == 1
    assert (await row(queue))["state"] == "closed"
    # The other worker learns the close on its next read and calls again.
    for worker in (a, b):
        worker.advance(1)
        assert await worker.breaker().call(Service()) == "ok"
        assert worker.breaker().state is CircuitState.CLOSED


async def test_a_failed_trial_reopens_the_circuit_for_everyone(
    queue: Queue, workers: tuple[Worker, Worker]
) -> None:
    a, b = workers
    await fail(a.breaker(), 5)
    await reset_elapses(queue, a, b)
    await fail(b.breaker(), 1)  # b wins the permit and its trial fails
    state = await row(queue)
    assert state["state"] == "open" and state["waiting"] and state["trial_owner"] is None
    a.advance(1)
    service = Service()
    with pytest.raises(CircuitOpenError):
        await a.breaker().call(service)
    assert service.calls == 0


async def test_a_cancelled_trial_hands_the_permit_back(
    queue: Queue, workers: tuple[Worker, Worker]
) -> None:
    a, b = workers
    await fail(a.breaker(), 5)
    await reset_elapses(queue, a, b)
    service = Service()
    service.gate = asyncio.Event()
    task = asyncio.create_task(a.breaker().call(service))
    await service.entered.wait()
    assert (await row(queue))["trial_owner"] == a.registry.store.owner
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await a.registry.detach()  # waits for the background release
    assert (await row(queue))["trial_owner"] is None
    assert await b.breaker().call(Service()) == "ok"
    assert b.breaker().state is CircuitState.CLOSED


async def test_a_worker_that_starts_during_an_outage_refuses_at_once(
    queue: Queue, workers: tuple[Worker, Worker]
) -> None:
    a, _ = workers
    await fail(a.breaker(), 5)
    late = Worker(CircuitBreakerSettings(fail_max=5, reset_timeout=60))
    late.breaker()
    await late.registry.attach(queue)  # the first read already opens it
    try:
        assert late.breaker().state is CircuitState.OPEN
        service = Service()
        with pytest.raises(CircuitOpenError):
            await late.breaker().call(service)
        assert service.calls == 0
    finally:
        await late.registry.detach()


async def test_breakers_that_are_not_fleet_wide_stay_local(
    queue: Queue, workers: tuple[Worker, Worker]
) -> None:
    settings = CircuitBreakerSettings(overrides={"embeddings": {"fleet_wide": False}})
    a, b = Worker(settings), Worker(settings)
    await a.registry.attach(queue)
    await b.registry.attach(queue)
    try:
        await fail(a.breaker(), 5)
        b.advance(1)
        assert await b.breaker().call(Service()) == "ok"
    finally:
        await a.registry.detach()
        await b.registry.detach()
