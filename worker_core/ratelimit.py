"""Rate limits on calls to external services: ``TokenBucket`` and ``RateLimiterRegistry``.

One bucket per named service (``WorkerConfig.rate_limits``: ``{name: {rate, burst}}``)
is shared by every job of a worker; with ``fleet_wide: true`` it is a ``FleetBucket``
(``worker_core.fleetlimit``) shared by every worker of the schema. ``rate`` tokens
per second refill a bucket of ``burst`` tokens; a call takes one (or ``n``) and
waits when the bucket is empty.

Waiting is fair: ``acquire`` reserves its tokens at once, letting the balance go
negative, and sleeps until the refill has paid that debt. Each waiter therefore
has a wake-up time fixed at arrival, later than every earlier waiter's, so callers
go in arrival order however many of them wait, and nobody polls. The bucket never
touches the database, so a job waiting on it holds no connection (acquire the
token before borrowing one). A job that would wait too long can be deferred
instead: ``acquire(max_wait=...)`` raises ``RetryableError`` with the wait as
``retry_after``, without taking a token.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .errors import RetryableError

if TYPE_CHECKING:
    from .config import RateLimitSettings, WorkerConfig
    from .fleet import Database
    from .fleetlimit import FleetBucket

__all__ = ["RateLimiter", "RateLimiterRegistry", "TokenBucket"]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]


@runtime_checkable
class RateLimiter(Protocol):
    """What stages use of a limiter, per process (``TokenBucket``) or fleet-wide."""

    name: str
    rate: float
    burst: int

    async def acquire(self, n: int = 1, *, max_wait: float | None = None) -> float: ...

    def wait_time(self, n: int = 1) -> float: ...

    def try_acquire(self, n: int = 1) -> bool: ...


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` saved up.

    Args:
        rate: tokens added per second (> 0).
        burst: the bucket's capacity, i.e. how many calls may go at once after a
            quiet period (>= 1). A full bucket is where it starts.
        name: the service, for error messages.
        clock: seconds from a monotonic source (``time.monotonic``); tests pass a fake.
        sleep: ``asyncio.sleep`` unless a test drives time itself.
    """

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        name: str = "",
        clock: Clock | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate limit {name!r}: rate must be a positive number, not {rate!r}")
        if burst < 1:
            raise ValueError(f"rate limit {name!r}: burst must be >= 1, not {burst!r}")
        self.rate = float(rate)
        self.burst = int(burst)
        self.name = name
        self._clock: Clock = clock or time.monotonic
        self._sleep: Sleep = sleep or asyncio.sleep
        self._tokens = float(self.burst)
        self._updated = self._clock()
        #: Callers sleeping on the bucket now.
        self.waiting = 0

    @property
    def tokens(self) -> float:
        """Tokens available now; negative while waiters hold reservations."""
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._updated = max(now, self._updated)

    def _check(self, n: int) -> None:
        if n < 1 or n > self.burst:
            raise ValueError(
                f"rate limit {self.name!r}: cannot take {n} tokens from a bucket of {self.burst}"
            )

    def wait_time(self, n: int = 1) -> float:
        """Seconds an ``acquire(n)`` made now would wait (0 when it would not)."""
        self._check(n)
        self._refill()
        missing = n - self._tokens
        return missing / self.rate if missing > 0 else 0.0

    def try_acquire(self, n: int = 1) -> bool:
        """Take ``n`` tokens if they are available now, never waiting.

        Fails while others wait, since their reservations hold the balance below zero.
        """
        self._check(n)
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    async def acquire(self, n: int = 1, *, max_wait: float | None = None) -> float:
        """Take ``n`` tokens, waiting for the refill if needed; returns the seconds waited.

        Raises:
            RetryableError: the wait would exceed ``max_wait``; no token was taken,
                and ``retry_after`` is the wait (defer the job rather than hold its slot).
            ValueError: ``n`` is below 1 or above ``burst``.
        """
        wait = self.wait_time(n)
        if max_wait is not None and wait > max_wait:
            raise RetryableError(
                f"rate limit {self.name!r}: a call would wait {wait:.3g}s (max {max_wait:g}s)",
                retry_after=wait,
                service=self.name,
            )
        self._tokens -= n  # the reservation: later callers queue behind it
        if wait <= 0:
            return 0.0
        self.waiting += 1
        try:
            await self._sleep(wait)
        except BaseException:
            # A cancelled waiter hands its reservation back. Later waiters keep the
            # wake-up times they were given, so the order and the rate both hold.
            self._refill()
            self._tokens = min(float(self.burst), self._tokens + n)
            raise
        finally:
            self.waiting -= 1
        return wait

    def __repr__(self) -> str:
        return f"TokenBucket({self.name!r}, rate={self.rate:g}, burst={self.burst})"


class RateLimiterRegistry:
    """The rate-limited services of a worker: one bucket per name.

    ``get(name)`` is ``None`` for a service without a configured limit;
    ``await registry.acquire(name)`` is then free. Fleet-wide buckets limit this
    process alone until ``attach`` hands them the database.
    """

    def __init__(
        self,
        limits: Mapping[str, RateLimitSettings] | None = None,
        *,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._buckets: dict[str, RateLimiter] = {}
        self._db: Database | None = None
        for name, limit in (limits or {}).items():
            if limit.fleet_wide:
                self.add_fleet(name, limit.rate, limit.burst)
            else:
                self.add(name, limit.rate, limit.burst)

    @classmethod
    def from_config(
        cls, config: WorkerConfig, *, clock: Clock | None = None, sleep: Sleep | None = None
    ) -> RateLimiterRegistry:
        """The buckets of ``config.rate_limits``."""
        return cls(config.rate_limits, clock=clock, sleep=sleep)

    def add(self, name: str, rate: float, burst: int = 1) -> TokenBucket:
        """Create (or replace) the bucket of ``name``."""
        bucket = TokenBucket(rate, burst, name=name, clock=self._clock, sleep=self._sleep)
        self._buckets[name] = bucket
        return bucket

    def add_fleet(self, name: str, rate: float, burst: int = 1) -> FleetBucket:
        """Create (or replace) the fleet-wide bucket of ``name``."""
        from .fleetlimit import FleetBucket

        bucket = FleetBucket(rate, burst, name=name, clock=self._clock, sleep=self._sleep)
        self._buckets[name] = bucket
        if self._db is not None:
            self._attach(bucket, self._db)
        return bucket

    def _fleet(self) -> list[FleetBucket]:
        from .fleetlimit import FleetBucket

        return [b for b in self._buckets.values() if isinstance(b, FleetBucket)]

    async def attach(self, db: Database) -> None:
        """Share the fleet-wide buckets through ``db`` (a Queue) from now on."""
        self._db = db
        for bucket in self._fleet():
            self._attach(bucket, db)

    def _attach(self, bucket: FleetBucket, db: Database) -> None:
        from .fleet import TokenLeaseStore

        bucket.attach(TokenLeaseStore(db))

    async def detach(self) -> None:
        """Stop sharing; each fleet-wide bucket gives back the tokens it will not use."""
        self._db = None
        for bucket in self._fleet():
            await bucket.detach()

    def get(self, name: str) -> RateLimiter | None:
        return self._buckets.get(name)

    async def acquire(self, name: str, n: int = 1, *, max_wait: float | None = None) -> float:
        """``acquire`` on the bucket of ``name``; 0 at once when it has no limit."""
        bucket = self._buckets.get(name)
        return 0.0 if bucket is None else await bucket.acquire(n, max_wait=max_wait)

    def __getitem__(self, name: str) -> RateLimiter:
        return self._buckets[name]

    def __contains__(self, name: object) -> bool:
        return name in self._buckets

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._buckets))

    def __len__(self) -> int:
        return len(self._buckets)

    def items(self) -> list[tuple[str, RateLimiter]]:
        return list(self._buckets.items())

    def __repr__(self) -> str:
        return f"RateLimiterRegistry({sorted(self._buckets)!r})"
