"""FleetBucket on a fake clock, against an in-memory model of the lease statement
(``sql/limits.sql``; the real one runs in tests/integration/test_fleet_limits.py)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker_core.config import WorkerConfig
from worker_core.errors import RetryableError
from worker_core.fleetlimit import FleetBucket
from worker_core.ratelimit import RateLimiter, RateLimiterRegistry, TokenBucket


class FakeTime:
    """A clock plus a sleep that returns only when ``advance`` passes its deadline."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + delay, next(self._order), future))
        await future

    async def settle(self) -> None:
        for _ in range(30):  # let woken tasks, and the leases they start, run
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        target = self.now + seconds
        while self._sleepers and self._sleepers[0][0] <= target + 1e-9:
            when, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, when)
            if not future.done():
                future.set_result(None)
            await self.settle()
        self.now = target
        await self.settle()


class ModelStore:
    """The lease statement's arithmetic, on the fake clock (one row)."""

    def __init__(self, clock: FakeTime) -> None:
        self.clock = clock
        self.tokens: float | None = None
        self.updated = 0.0
        self.round_trips = 0
        self.down = False

    async def lease(self, name: str, *, rate: float, burst: int, want: int) -> float:
        self.round_trips += 1
        if self.down:
            raise ConnectionError("connection refused")
        now = self.clock()
        if self.tokens is None:
            self.tokens, self.updated = float(burst), now
        self.tokens = min(burst, self.tokens + rate * max(0.0, now - self.updated)) - want
        self.updated = max(self.updated, now)
        return self.tokens + want

    async def give_back(self, name: str, n: int) -> None:
        self.round_trips += 1
        assert self.tokens is not None
        self.tokens += n


def fleet(fake: FakeTime, store: ModelStore, rate: float, burst: int, **kw: float) -> FleetBucket:
    bucket = FleetBucket(rate, burst, name="api", clock=fake, sleep=fake.sleep, **kw)
    bucket.attach(store)  # type: ignore[arg-type]
    return bucket


async def hammer(bucket: FleetBucket, fake: FakeTime, calls: list[float], stop: float) -> None:
    while fake.now < stop:
        await bucket.acquire()
        calls.append(fake.now)


async def finish(tasks: list[asyncio.Task[None]]) -> None:
    """End the callers still waiting (with many callers, tokens are reserved far ahead)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def assert_within_rate(calls: list[float], start: float, rate: float, burst: int) -> None:
    """The k-th call (0-based) came no earlier than a bucket of ``burst`` allows."""
    for k, at in enumerate(sorted(calls)):
        assert at - start >= (k + 1 - burst) / rate - 1e-6, (k, at - start)


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


def test_it_is_a_rate_limiter(fake: FakeTime) -> None:
    assert isinstance(FleetBucket(1.0, name="x"), RateLimiter)
    assert isinstance(TokenBucket(1.0, name="x"), RateLimiter)
    for n in (0, 6, True, 1.5):
        with pytest.raises(ValueError, match="cannot take"):
            FleetBucket(1.0, 5, name="x").wait_time(n)  # type: ignore[arg-type]
    bads: list[dict[str, Any]] = [
        {"horizon": math.nan},
        {"token_ttl": 0.0},
        {"retry_interval": -1.0},
    ]
    for bad in bads:
        with pytest.raises(ValueError, match="out of range"):
            FleetBucket(1.0, 1, name="x", **bad)
    with pytest.raises(ValueError, match="rate must be a positive number"):
        FleetBucket(math.inf, name="x")
    with pytest.raises(ValueError, match="rate limit name must not be blank"):
        FleetBucket(1.0)
    with pytest.raises(ValueError, match="control characters"):
        FleetBucket(1.0, name="a\x00b")


async def test_detached_it_limits_this_process_alone(fake: FakeTime) -> None:
    bucket = FleetBucket(2.0, 2, name="api", clock=fake, sleep=fake.sleep)
    assert not bucket.active
    assert [bucket.try_acquire() for _ in range(3)] == [True, True, False]
    assert bucket.wait_time() == pytest.approx(0.5)


async def test_one_worker_gets_burst_then_rate(fake: FakeTime) -> None:
    store = ModelStore(fake)
    bucket = fleet(fake, store, rate=10.0, burst=5)
    calls: list[float] = []
    start = fake.now
    tasks = [asyncio.create_task(hammer(bucket, fake, calls, start + 3)) for _ in range(4)]
    await fake.settle()
    assert len(calls) == 5  # the full bucket at once
    while fake.now < start + 3:
        await fake.advance(0.01)
    await finish(tasks)
    calls = [c for c in calls if c <= start + 3]
    assert_within_rate(calls, start, 10.0, 5)
    assert 5 + 30 - 2 <= len(calls) <= 5 + 30 + 1
    # Several tokens per round trip, even at this modest demand.
    assert store.round_trips / len(calls) < 0.5


@settings(max_examples=25, deadline=None)
@given(
    workers=st.integers(min_value=1, max_value=5),
    callers=st.integers(min_value=1, max_value=6),
    rate=st.sampled_from([3.0, 20.0, 200.0]),
    burst=st.integers(min_value=1, max_value=20),
    step=st.sampled_from([0.003, 0.01, 0.05]),
)
def test_a_fleet_never_exceeds_burst_plus_rate(
    workers: int, callers: int, rate: float, burst: int, step: float
) -> None:
    async def scenario() -> None:
        fake = FakeTime()
        store = ModelStore(fake)
        buckets = [fleet(fake, store, rate, burst) for _ in range(workers)]
        calls: list[float] = []
        start, seconds = fake.now, 2.0
        tasks = [
            asyncio.create_task(hammer(b, fake, calls, start + seconds))
            for b in buckets
            for _ in range(callers)
        ]
        while fake.now < start + seconds:
            await fake.advance(step)
        await finish(tasks)
        in_window = [c for c in calls if c <= start + seconds]
        assert_within_rate(in_window, start, rate, burst)
        # ...and uses nearly all of it (a lease's tokens reach callers as they fall due).
        assert len(in_window) >= burst + rate * seconds * 0.85 - 2

    asyncio.run(scenario())


async def test_round_trips_per_token_fall_with_demand(fake: FakeTime) -> None:
    store = ModelStore(fake)
    buckets = [fleet(fake, store, rate=200.0, burst=20) for _ in range(4)]
    calls: list[float] = []
    start = fake.now
    tasks = [
        asyncio.create_task(hammer(b, fake, calls, start + 5)) for b in buckets for _ in range(8)
    ]
    while fake.now < start + 5:
        await fake.advance(0.005)
    await finish(tasks)
    calls = [c for c in calls if c <= start + 5]
    assert len(calls) >= 0.95 * (20 + 200 * 5)
    assert store.round_trips / len(calls) < 0.1
    assert sum(b.expired for b in buckets) == 0


async def test_max_wait_defers_and_keeps_the_tokens(fake: FakeTime) -> None:
    store = ModelStore(fake)
    bucket = fleet(fake, store, rate=1.0, burst=1)
    assert await bucket.acquire() == 0.0
    with pytest.raises(RetryableError, match="would wait") as caught:
        await bucket.acquire(max_wait=0.5)
    assert caught.value.retry_after == pytest.approx(1.0)
    trips = store.round_trips
    assert bucket.wait_time() == pytest.approx(1.0)  # the leased token waits for the next caller
    await fake.advance(1.0)
    assert bucket.try_acquire()
    assert store.round_trips == trips


async def test_a_database_outage_defers_at_once_and_heals(fake: FakeTime) -> None:
    store = ModelStore(fake)
    bucket = fleet(fake, store, rate=10.0, burst=3, retry_interval=2.0)
    for _ in range(3):
        await bucket.acquire()
    store.down = True
    while bucket._tokens:  # tokens leased before the outage are still used
        call = asyncio.create_task(bucket.acquire())
        await fake.advance(0.2)
        await call  # no RetryableError: the token was leased before the outage
    with pytest.raises(RetryableError, match=r"cannot lease tokens \(ConnectionError") as caught:
        await bucket.acquire()
    assert 0 < (caught.value.retry_after or 0) <= 2.0
    trips = store.round_trips
    with pytest.raises(RetryableError, match="fleet rate limit 'api'"):
        await bucket.acquire()
    assert store.round_trips == trips  # no new round trip until retry_interval has passed
    await fake.advance(2.1)
    store.down = False
    assert await bucket.acquire() == 0.0  # refilled meanwhile


async def test_a_worker_that_stops_gives_back_what_it_has_not_used(fake: FakeTime) -> None:
    store = ModelStore(fake)
    bucket = fleet(fake, store, rate=10.0, burst=1)
    calls: list[float] = []
    tasks = [asyncio.create_task(hammer(bucket, fake, calls, fake.now + 10)) for _ in range(8)]
    await fake.advance(1.0)
    assert store.tokens is not None and store.tokens < 0  # tokens reserved ahead
    await finish(tasks)
    await bucket.detach()
    assert not bucket.active
    # Refilled to now, the bucket holds no debt: every reservation still in the
    # future (those of the cancelled callers too) was given back.
    assert store.tokens + 10.0 * (fake.now - store.updated) >= -1e-9


async def test_tokens_unused_past_their_ttl_are_dropped(fake: FakeTime) -> None:
    store = ModelStore(fake)
    bucket = fleet(fake, store, rate=100.0, burst=50, token_ttl=0.5)
    for _ in range(20):  # a burst of demand: the bucket leases ahead
        await bucket.acquire()
    await fake.settle()
    stock = len(bucket._tokens)
    assert stock > 0
    assert bucket.tokens == stock  # valid now, and not handed out
    await fake.advance(5.0)  # nobody called meanwhile
    assert bucket.tokens == 0
    trips = store.round_trips
    assert await bucket.acquire() == 0.0  # a fresh lease, not the stale stock in a bunch
    assert bucket.expired == stock
    assert store.round_trips == trips + 1


async def test_a_cancelled_waiter_leaves_its_tokens_to_the_next(fake: FakeTime) -> None:
    store = ModelStore(fake)
    bucket = fleet(fake, store, rate=1.0, burst=1)
    await bucket.acquire()
    waiter = asyncio.create_task(bucket.acquire())
    await fake.settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    trips = store.round_trips
    await fake.advance(1.0)
    assert bucket.try_acquire()
    assert store.round_trips == trips


def test_the_registry_builds_fleet_buckets_from_config() -> None:
    config = WorkerConfig(
        rate_limits={"api": {"rate": 5, "burst": 2, "fleet_wide": True}, "s3": {"rate": 50}}
    )
    registry = RateLimiterRegistry.from_config(config)
    assert isinstance(registry["api"], FleetBucket)
    assert isinstance(registry["s3"], TokenBucket)
    assert (registry["api"].rate, registry["api"].burst) == (5.0, 2)
    assert config.rate_limits["s3"].fleet_wide is False
