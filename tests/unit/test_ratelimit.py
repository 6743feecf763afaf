"""TokenBucket and RateLimiterRegistry on a fake clock whose sleeps the test releases."""

from __future__ import annotations

import asyncio
import heapq
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker_core.config import RateLimitSettings, WorkerConfig
from worker_core.errors import RetryableError
from worker_core.ratelimit import RateLimiterRegistry, TokenBucket


class FakeTime:
    """A clock plus a sleep that only returns when ``advance`` passes its deadline."""

    def __init__(self) -> None:
        self.now = 100.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + delay, next(self._order), future))
        await future

    @property
    def sleeping(self) -> int:
        return sum(not f.done() for _, _, f in self._sleepers)

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        while self._sleepers and self._sleepers[0][0] <= self.now + 1e-9:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
        for _ in range(5):  # let the woken tasks run
            await asyncio.sleep(0)


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


def bucket(fake: FakeTime, rate: float = 1.0, burst: int = 1) -> TokenBucket:
    return TokenBucket(rate, burst, name="emb", clock=fake, sleep=fake.sleep)


async def test_burst_then_rate(fake: FakeTime) -> None:
    b = bucket(fake, rate=2.0, burst=3)
    assert [b.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert b.wait_time() == pytest.approx(0.5)
    await fake.advance(0.5)
    assert b.try_acquire() and not b.try_acquire()
    await fake.advance(100)
    assert b.tokens == 3  # never more than burst


async def test_acquire_returns_at_once_when_tokens_are_there(fake: FakeTime) -> None:
    b = bucket(fake, burst=2)
    assert await b.acquire() == 0.0
    assert await b.acquire() == 0.0
    assert fake.sleeping == 0


async def test_many_waiters_go_in_arrival_order_at_the_rate(fake: FakeTime) -> None:
    b = bucket(fake, rate=1.0, burst=1)
    assert b.try_acquire()
    order: list[int] = []

    async def caller(i: int) -> None:
        await b.acquire()
        order.append(i)

    tasks = [asyncio.create_task(caller(i)) for i in range(10)]
    await asyncio.sleep(0)
    assert b.waiting == 10 and order == []
    assert not b.try_acquire()  # a newcomer cannot jump the queue
    for second in range(1, 11):
        await fake.advance(1.0)
        assert order == list(range(second))  # exactly one more per second, first come first
    await asyncio.gather(*tasks)
    assert b.waiting == 0


async def test_a_cancelled_waiter_gives_its_reservation_back(fake: FakeTime) -> None:
    b = bucket(fake, rate=1.0, burst=1)
    assert b.try_acquire()
    first = asyncio.create_task(b.acquire())
    second = asyncio.create_task(b.acquire())
    await asyncio.sleep(0)
    assert b.tokens == pytest.approx(-2.0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert b.tokens == pytest.approx(-1.0)
    await fake.advance(2.0)
    assert second.done() and second.result() == pytest.approx(2.0)
    assert b.tokens == pytest.approx(1.0)  # the cancelled caller's slot is a token again


async def test_max_wait_defers_instead_of_waiting(fake: FakeTime) -> None:
    b = bucket(fake, rate=0.5, burst=1)
    assert b.try_acquire()
    with pytest.raises(RetryableError) as info:
        await b.acquire(max_wait=1.0)
    assert info.value.retry_after == pytest.approx(2.0)
    assert b.tokens == pytest.approx(0.0)  # nothing was reserved
    await fake.advance(2.0)
    assert await b.acquire(max_wait=1.0) == 0.0


def test_bad_arguments_are_refused(fake: FakeTime) -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(0)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(1, 0)
    b = bucket(fake, burst=2)
    with pytest.raises(ValueError, match="cannot take 3"):
        b.try_acquire(3)
    assert repr(b) == "TokenBucket('emb', rate=1, burst=2)"


async def test_registry_from_config(fake: FakeTime) -> None:
    config = WorkerConfig(rate_limits={"emb": {"rate": 5, "burst": 2}})
    registry = RateLimiterRegistry.from_config(config, clock=fake, sleep=fake.sleep)
    assert "emb" in registry and len(registry) == 1 and list(registry) == ["emb"]
    emb = registry["emb"]
    assert (emb.rate, emb.burst) == (5.0, 2)
    assert registry.get("s3") is None
    assert await registry.acquire("s3") == 0.0  # no limit configured: free
    assert await registry.acquire("emb", 2) == 0.0
    assert not emb.try_acquire()
    other = RateLimiterRegistry({"x": RateLimitSettings(rate=1)})
    assert other["x"].burst == 1 and dict(other.items())["x"] is other["x"]


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.1, 1000),
    burst=st.integers(1, 50),
    steps=st.lists(st.tuples(st.floats(0, 5), st.integers(1, 50)), min_size=1, max_size=40),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    now = [0.0]
    b = TokenBucket(rate, burst, clock=lambda: now[0])
    taken = 0
    for dt, n in steps:
        now[0] += dt
        if b.try_acquire(min(n, burst)):
            taken += min(n, burst)
        assert taken <= burst + rate * now[0] + 1e-6
        assert b.tokens <= burst
