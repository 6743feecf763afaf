"""CircuitBreaker and BreakerRegistry with a fake clock: no sockets, no sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pybreaker
import pytest

from worker_core.breaker import BreakerRegistry, CircuitBreaker, CircuitState
from worker_core.config import CircuitBreakerSettings
from worker_core.errors import (
    CircuitOpenError,
    PermanentError,
    RetryableError,
    TransientError,
)
from worker_core.fleet import FleetStore


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Boom(Exception):
    pass


class Service:
    """A fake dependency that counts the calls that reached it."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self, value: str = "ok") -> str:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return value


def make(clock: FakeClock, **kw: Any) -> CircuitBreaker:
    return CircuitBreaker("svc", clock=clock, **kw)


async def fail_times(breaker: CircuitBreaker, n: int, exc: BaseException | None = None) -> None:
    service = Service()
    service.fail = exc or Boom("down")
    for _ in range(n):
        with pytest.raises(type(service.fail)):
            await breaker.call(service)


async def trip(breaker: CircuitBreaker) -> None:
    await fail_times(breaker, breaker.fail_max)
    assert_state(breaker, CircuitState.OPEN)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_closed_until_fail_max_consecutive_failures(clock: FakeClock) -> None:
    breaker = make(clock)
    assert_state(breaker, CircuitState.CLOSED)
    assert breaker.retry_after == 0.0
    assert await breaker.call(Service(), "hello") == "hello"
    await fail_times(breaker, 4)
    assert_state(breaker, CircuitState.CLOSED)
    assert breaker.failure_count == 4
    await fail_times(breaker, 1)  # the 5th raises the original error, and trips
    assert_state(breaker, CircuitState.OPEN)
    assert breaker.retry_after == pytest.approx(60.0)


async def test_a_success_resets_the_streak(clock: FakeClock) -> None:
    breaker = make(clock)
    await fail_times(breaker, 4)
    await breaker.call(Service())
    assert breaker.failure_count == 0
    await fail_times(breaker, 4)
    assert_state(breaker, CircuitState.CLOSED)


async def test_open_rejects_without_calling(clock: FakeClock) -> None:
    breaker = make(clock)
    await trip(breaker)
    service = Service()
    clock.advance(20)
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(service)
    assert service.calls == 0
    assert info.value.breaker == "svc"
    assert info.value.retry_after == pytest.approx(40.0)
    assert isinstance(info.value, RetryableError)
    clock.advance(39.9)
    with pytest.raises(CircuitOpenError):
        await breaker.call(service)
    assert service.calls == 0
    clock.advance(0.1)
    assert_state(breaker, CircuitState.HALF_OPEN)
    assert breaker.retry_after == 0.0


async def test_half_open_admits_exactly_one_trial_while_ten_callers_race(clock: FakeClock) -> None:
    breaker = make(clock)
    await trip(breaker)
    clock.advance(60)
    service = Service()
    service.gate = asyncio.Event()
    tasks = [asyncio.create_task(breaker.call(service)) for _ in range(10)]
    await service.entered.wait()
    await asyncio.sleep(0)  # let every other caller reach the breaker
    rejected = [t for t in tasks if t.done()]
    assert len(rejected) == 9
    for task in rejected:
        with pytest.raises(CircuitOpenError) as info:
            task.result()
        assert info.value.retry_after == pytest.approx(breaker.busy_retry_after)
    assert service.calls == 1
    assert_state(breaker, CircuitState.HALF_OPEN)
    service.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results.count("ok") == 1
    assert_state(breaker, CircuitState.CLOSED)


async def test_half_open_max_calls_bounds_the_trials(clock: FakeClock) -> None:
    breaker = make(clock, half_open_max_calls=3)
    await trip(breaker)
    clock.advance(60)
    service = Service()
    service.gate = asyncio.Event()
    tasks = [asyncio.create_task(breaker.call(service)) for _ in range(10)]
    await asyncio.sleep(0)
    assert service.calls == 3
    service.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results.count("ok") == 3
    assert_state(breaker, CircuitState.CLOSED)


async def test_a_failed_trial_reopens_for_a_full_reset_timeout(clock: FakeClock) -> None:
    breaker = make(clock)
    await trip(breaker)
    clock.advance(61)
    await fail_times(breaker, 1)
    assert_state(breaker, CircuitState.OPEN)
    assert breaker.retry_after == pytest.approx(60.0)
    clock.advance(60)
    assert await breaker.call(Service()) == "ok"
    assert_state(breaker, CircuitState.CLOSED)
    assert breaker.failure_count == 0


async def test_excluded_errors_never_open_it_and_do_not_reset_the_streak(clock: FakeClock) -> None:
    breaker = make(clock, exclude=[KeyError, lambda exc: "ignore me" in str(exc)])
    await fail_times(breaker, 20, KeyError("x"))
    await fail_times(breaker, 20, Boom("ignore me"))
    assert_state(breaker, CircuitState.CLOSED)
    assert breaker.failure_count == 0
    await fail_times(breaker, 4)
    await fail_times(breaker, 3, KeyError("x"))  # pybreaker would count these as successes
    assert breaker.failure_count == 4
    await fail_times(breaker, 1)
    assert_state(breaker, CircuitState.OPEN)


async def test_worker_core_verdicts_are_always_neutral(clock: FakeClock) -> None:
    breaker = make(clock)
    await fail_times(breaker, 10, PermanentError("bad input"))
    await fail_times(breaker, 10, RetryableError("slow down", retry_after=1))
    await fail_times(breaker, 10, CircuitOpenError(breaker="other"))
    assert_state(breaker, CircuitState.CLOSED)
    assert breaker.failure_count == 0
    await fail_times(breaker, 5, TransientError("timeout"))
    assert_state(breaker, CircuitState.OPEN)


async def test_an_excluded_error_does_not_close_a_half_open_circuit(clock: FakeClock) -> None:
    breaker = make(clock, exclude=[KeyError])
    await trip(breaker)
    clock.advance(60)
    await fail_times(breaker, 1, KeyError("x"))
    assert_state(breaker, CircuitState.HALF_OPEN)
    # The trial permit came back: the next caller is the new trial.
    await fail_times(breaker, 1)
    assert_state(breaker, CircuitState.OPEN)


async def test_cancellation_is_neither_success_nor_failure(clock: FakeClock) -> None:
    breaker = make(clock)
    await fail_times(breaker, 4)
    for _ in range(10):
        service = Service()
        service.gate = asyncio.Event()
        task = asyncio.create_task(breaker.call(service))
        await service.entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert_state(breaker, CircuitState.CLOSED)
    assert breaker.failure_count == 4  # not reset either
    await fail_times(breaker, 1)
    assert_state(breaker, CircuitState.OPEN)


async def test_a_cancelled_trial_frees_its_permit(clock: FakeClock) -> None:
    breaker = make(clock)
    await trip(breaker)
    clock.advance(60)
    service = Service()
    service.gate = asyncio.Event()
    task = asyncio.create_task(breaker.call(service))
    await service.entered.wait()
    with pytest.raises(CircuitOpenError):
        await breaker.call(Service())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_state(breaker, CircuitState.HALF_OPEN)
    assert await breaker.call(Service()) == "ok"
    assert_state(breaker, CircuitState.CLOSED)


async def test_outcomes_of_calls_admitted_before_a_trip_are_ignored(clock: FakeClock) -> None:
    breaker = make(clock)
    slow = Service()
    slow.gate = asyncio.Event()
    task = asyncio.create_task(breaker.call(slow))
    await slow.entered.wait()
    await trip(breaker)
    slow.gate.set()
    assert await task == "ok"  # a success that started before the outage proves nothing
    assert_state(breaker, CircuitState.OPEN)


async def test_listeners_see_every_transition_and_cannot_break_calls(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[tuple[str, CircuitState, CircuitState]] = []

    def broken(name: str, old: CircuitState, new: CircuitState) -> None:
        raise RuntimeError("listener bug")

    breaker = make(clock, listeners=[broken])
    breaker.add_listener(lambda *event: events.append(event))
    with caplog.at_level(logging.INFO, logger="worker_core.breaker"):
        await trip(breaker)
        clock.advance(60)
        await breaker.call(Service())
    assert events == [
        ("svc", CircuitState.CLOSED, CircuitState.OPEN),
        ("svc", CircuitState.OPEN, CircuitState.HALF_OPEN),
        ("svc", CircuitState.HALF_OPEN, CircuitState.CLOSED),
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("circuit opened") for m in messages)
    assert any(m.startswith("circuit closed") for m in messages)
    assert any(r.levelno == logging.WARNING for r in caplog.records)


async def test_call_accepts_functions_that_return_awaitables(clock: FakeClock) -> None:
    breaker = make(clock)
    service = Service()

    def sync_wrapper() -> Awaitable[str]:
        return service("via wrapper")

    assert await breaker.call(sync_wrapper) == "via wrapper"
    not_async: Callable[[], Any] = lambda: "plain"  # noqa: E731
    for _ in range(10):
        with pytest.raises(TypeError, match="not an awaitable"):
            await breaker.call(not_async)
    assert_state(breaker, CircuitState.CLOSED)
    assert breaker.failure_count == 0


def test_state_values_and_validation() -> None:
    assert [s.value for s in CircuitState] == ["closed", "open", "half_open"]
    assert str(CircuitState.HALF_OPEN) == "half_open"
    with pytest.raises(ValueError, match="fail_max"):
        CircuitBreaker("x", fail_max=0)
    with pytest.raises(ValueError, match="name"):
        CircuitBreaker("")
    breaker = CircuitBreaker("x")
    assert repr(breaker) == "CircuitBreaker('x', state='closed')"
    assert breaker.snapshot()["state"] == "closed"


def test_pybreaker_internals_we_rely_on() -> None:
    """Fails loudly when a pybreaker release moves what the wrapper touches."""
    events: list[tuple[str | None, str]] = []

    class Recorder(pybreaker.CircuitBreakerListener):
        def state_change(self, cb: Any, old: Any, new: Any) -> None:
            events.append((old.name if old else None, new.name))

    cb = pybreaker.CircuitBreaker(fail_max=2, listeners=[Recorder()], throw_new_error_on_trip=True)
    assert (pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN) == (
        "closed",
        "open",
        "half-open",
    )
    with cb._lock, cb._lock:  # a re-entrant lock
        pass
    assert isinstance(cb._state_storage, pybreaker.CircuitMemoryStorage)
    assert cb.current_state == "closed" and cb.fail_counter == 0
    cb.state._handle_error(Boom(), reraise=False)
    assert cb.fail_counter == 1 and cb.state.name == "closed"
    with pytest.raises(pybreaker.CircuitBreakerError):
        cb.state._handle_error(Boom(), reraise=False)  # the trip is signalled by raising
    assert cb.state.name == "open"
    cb.half_open()
    assert cb.state.name == "half-open"
    cb.state._handle_success()
    assert cb.state.name == "closed" and cb.fail_counter == 0
    cb.open()
    cb.close()
    assert events == [
        ("closed", "open"),
        ("open", "half-open"),
        ("half-open", "closed"),
        ("closed", "open"),
        ("open", "closed"),
    ]


def test_registry_shares_one_breaker_per_name_with_overrides(clock: FakeClock) -> None:
    settings = CircuitBreakerSettings(
        fail_max=3,
        reset_timeout=10,
        overrides={"s3": {"fail_max": 7, "fleet_wide": False}, "emb": {"reset_timeout": 2.5}},
    )
    seen: list[str] = []
    registry = BreakerRegistry(settings, clock=clock)
    emb = registry.get("emb")
    registry.add_listener(lambda name, old, new: seen.append(name))
    assert registry.get("emb") is emb
    assert (emb.fail_max, emb.reset_timeout, emb.fleet_wide) == (3, 2.5, True)
    s3 = registry.get("s3")
    assert (s3.fail_max, s3.reset_timeout, s3.fleet_wide) == (7, 10.0, False)
    assert "emb" in registry and "nope" not in registry and len(registry) == 2
    assert sorted(registry) == ["emb", "s3"]
    assert registry["s3"] is s3 and dict(registry.items()) == {"emb": emb, "s3": s3}
    with pytest.raises(KeyError):
        registry["nope"]
    assert set(registry.snapshot()) == {"emb", "s3"}
    assert not registry.store.active
    s3._force("open", 10.0)
    assert seen == ["s3"]


async def test_fleet_breakers_work_locally_until_attached(clock: FakeClock) -> None:
    store = FleetStore(clock=clock)
    breaker = CircuitBreaker("svc", clock=clock, store=store)
    assert breaker.fleet_wide and not store.active
    await trip(breaker)
    with pytest.raises(CircuitOpenError):
        await breaker.call(Service())
    await store.detach()  # harmless when never attached
    with pytest.raises(ValueError, match="already uses"):
        CircuitBreaker("svc", store=store)


class BrokenDatabase:
    """A Queue stand-in whose connections fail (or hang) like a database outage."""

    schema = "wc"

    def __init__(self, *, hang: bool = False) -> None:
        self.hang = hang
        self.attempts = 0

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        self.attempts += 1
        if self.hang:
            await asyncio.Event().wait()
        raise psycopg.OperationalError("connection to server failed: password=hunter2 refused")
        yield  # type: ignore[unreachable]  # makes this a generator; never reached


@pytest.mark.parametrize("hang", [False, True])
async def test_database_errors_never_fail_a_call(
    clock: FakeClock, caplog: pytest.LogCaptureFixture, hang: bool
) -> None:
    db = BrokenDatabase(hang=hang)
    registry = BreakerRegistry(CircuitBreakerSettings(), clock=clock)
    registry.store.db_timeout = 0.01
    breaker = registry.get("svc")
    with caplog.at_level(logging.INFO, logger="worker_core.breaker"):
        await registry.attach(db)
        assert await breaker.call(Service()) == "ok"
        await trip(breaker)  # local state still works
        clock.advance(60)
        assert await breaker.call(Service()) == "ok"
        await registry.detach()
    assert_state(breaker, CircuitState.CLOSED)
    # One try at attach; the store then stays local for retry_interval (the fake clock
    # passed it once, before the trial), so the calls in between cost no round trip.
    assert db.attempts == 2
    warnings = [r for r in caplog.records if "fleet breaker state unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert "hunter2" not in caplog.text


def test_breaker_queries_render_for_any_schema() -> None:
    from worker_core.sql import load_queries, migrations, render

    queries = load_queries("breakers.sql")
    assert set(queries) == {
        "ensure",
        "fetch",
        "record_failure",
        "record_success",
        "claim_trial",
        "release_trial",
        "release_owner",
    }
    for text in queries.values():
        rendered = render(text, 'odd"schema').as_string(None)
        assert "{schema}" not in rendered and '"odd""schema".breakers' in rendered
    assert any(m.name == "breakers" for m in migrations())


async def test_success_of_a_call_admitted_before_the_failures_does_not_reset_them(
    clock: FakeClock,
) -> None:
    breaker = make(clock, fail_max=3)
    slow = Service()
    slow.gate = asyncio.Event()
    in_flight = asyncio.create_task(breaker.call(slow))  # admitted while healthy
    await slow.entered.wait()
    clock.advance(0.1)
    await fail_times(breaker, 2)  # the service goes down
    slow.gate.set()
    assert await in_flight == "ok"  # the old call answers late, successfully
    assert breaker.failure_count == 2  # ... which says nothing about the service now
    await fail_times(breaker, 1)
    assert_state(breaker, CircuitState.OPEN)  # fail_max consecutive failures, as called


async def test_calls_go_one_at_a_time_while_failures_are_counted(clock: FakeClock) -> None:
    breaker = make(clock, fail_max=3)
    await fail_times(breaker, 1)
    first, second = Service(), Service()
    first.gate = asyncio.Event()
    first.fail = Boom("still down")
    a = asyncio.create_task(breaker.call(first))
    await first.entered.wait()
    b = asyncio.create_task(breaker.call(second))
    await asyncio.sleep(0)
    assert second.calls == 0  # waits for the verdict of the call in flight
    first.gate.set()
    with pytest.raises(Boom):
        await a
    assert await b == "ok"  # admitted after it: one more failure would have tripped
    assert breaker.failure_count == 0
    # Healthy again: calls run concurrently.
    third, fourth = Service(), Service()
    third.gate = asyncio.Event()
    c = asyncio.create_task(breaker.call(third))
    await third.entered.wait()
    assert await breaker.call(fourth) == "ok"
    third.gate.set()
    assert await c == "ok"


def assert_state(breaker: CircuitBreaker, expected: CircuitState) -> None:
    # A helper, not `assert breaker.state is X` inline: mypy narrows the property at
    # the first assert and reads the next one, after a call, as unreachable.
    assert breaker.state is expected, breaker.snapshot()
