"""FleetBucket: one token bucket for every worker of a schema (``rate_limits.<name>.fleet_wide``).

The bucket itself is a row of ``{schema}.rate_limits`` (migration 8; queries in
``sql/limits.sql``). A worker does not ask the database for each token: it
*leases* a batch in one round trip and hands the tokens to its own callers. The
lease reserves tokens even when the bucket is empty, letting its balance go
negative, and returns the balance it found; from it the worker knows when each
leased token may be used (token ``k`` at ``(k - balance) / rate`` seconds after the
lease), so the fleet's calls never exceed ``burst + rate * elapsed`` however the
tokens are spread, and leases are served in the order the database saw them.

Cost: a lease is sized by this worker's recent demand (about ``horizon`` seconds of
it, at most ``horizon`` seconds of the fleet's rate), and the next lease is taken in
the background while a horizon's worth of stock is still left, so a busy worker makes one round trip
per many tokens and its callers rarely wait for one. A token not used within
``token_ttl`` seconds of becoming valid is dropped rather than used late (that
would bunch calls up); tokens still in the future when the worker stops are given
back.

When the database cannot be reached (a lease fails or takes longer than the
store's timeout), ``acquire`` uses the tokens already leased and otherwise raises
``RetryableError`` at once, for ``retry_interval`` seconds before it tries again:
the job is deferred (its attempt refunded) rather than calling the service
without the fleet's permission or waiting forever. Before ``attach`` (outside a
running worker) the bucket limits this process alone, like a ``TokenBucket``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .errors import RetryableError
from .jobs import check_label
from .logs import StructuredLogger
from .ratelimit import Clock, Sleep, TokenBucket
from .redact import redact_text

if TYPE_CHECKING:
    from .fleet import TokenLeaseStore

__all__ = ["FleetBucket"]

#: Seconds over which this worker's demand is averaged to size its leases.
_DEMAND_TAU = 1.0
_MAX_LEASE = 10_000


class FleetBucket:
    """A token bucket shared by the fleet: ``rate`` tokens per second for all workers
    together, at most ``burst`` saved up.

    Args:
        rate, burst, name, clock, sleep: as for ``TokenBucket``.
        horizon: a lease covers about this many seconds of this worker's demand, and
            never more than this many seconds of ``rate``.
        token_ttl: a leased token unused this long after it became valid is dropped.
        retry_interval: after a failed lease, seconds before the next try.
    """

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        name: str = "",
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        horizon: float = 0.5,
        token_ttl: float = 1.0,
        retry_interval: float = 2.0,
    ) -> None:
        # The name keys the shared row; the per-process bucket validates rate and
        # burst, and limits this process alone while no database is attached.
        check_label(name, "rate limit name")
        self._local = TokenBucket(rate, burst, name=name, clock=clock, sleep=sleep)
        if not (0 < horizon <= 60 and 0 < token_ttl <= 60 and 0 < retry_interval <= 3600):
            raise ValueError(
                f"rate limit {name!r}: horizon, token_ttl or retry_interval is out of range"
            )
        self.rate = self._local.rate
        self.burst = self._local.burst
        self.name = name
        self.horizon = float(horizon)
        self.token_ttl = float(token_ttl)
        self.retry_interval = float(retry_interval)
        self._clock: Clock = clock or time.monotonic
        self._sleep: Sleep = sleep or asyncio.sleep
        self._store: TokenLeaseStore | None = None
        #: Release times (on our clock) of the leased tokens not handed out, ascending.
        self._tokens: deque[float] = deque()
        self._lock: asyncio.Lock | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._demand = 0.0
        self._demand_at = self._clock()
        self._wanted = 0
        self._down_until = 0.0
        self._error = ""
        self._log = StructuredLogger("worker_core.ratelimit", limiter=name)
        #: Callers inside ``acquire`` now.
        self.waiting = 0
        #: Leases taken, tokens leased, and leased tokens dropped unused (statistics).
        self.leases = 0
        self.leased = 0
        self.expired = 0

    @property
    def active(self) -> bool:
        """True while the bucket is shared through the database."""
        return self._store is not None

    def attach(self, store: TokenLeaseStore) -> None:
        """Share the bucket through ``store`` from now on (within the running loop)."""
        self._store = store
        self._lock = asyncio.Lock()  # a Lock belongs to one event loop; run() may use another
        self._tokens.clear()
        self._inflight = None
        self._down_until = 0.0

    async def detach(self) -> None:
        """Stop sharing: give back the leased tokens not yet valid (best effort)."""
        store, self._store = self._store, None
        if self._inflight is not None and not self._inflight.done():
            # A lease in flight may still bring tokens: wait for it (bounded) so that
            # they are counted and given back too.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._inflight), 2.0)
        future = sum(1 for t in self._tokens if t > self._clock())
        self._tokens.clear()
        if store is not None and future:
            with contextlib.suppress(Exception):
                await store.give_back(self.name, future)

    # -- the TokenBucket interface ---------------------------------------------------
    @property
    def tokens(self) -> float:
        """Leased tokens valid now and not handed out (the local bucket's when detached)."""
        if self._store is None:
            return self._local.tokens
        now = self._clock()
        return float(sum(1 for t in self._tokens if now - self.token_ttl <= t <= now))

    def wait_time(self, n: int = 1) -> float:
        """Seconds an ``acquire(n)`` made now would wait, as far as this worker knows:
        exact when it holds ``n`` leased tokens, else the fleet rate's lower bound."""
        self._check(n)
        if self._store is None:
            return self._local.wait_time(n)
        now = self._clock()
        self._expire(now)
        if len(self._tokens) >= n:
            return max(0.0, self._tokens[n - 1] - now)
        return (n - len(self._tokens)) / self.rate

    def try_acquire(self, n: int = 1) -> bool:
        """Take ``n`` leased tokens if they are valid now; never waits, never leases."""
        self._check(n)
        if self._store is None:
            return self._local.try_acquire(n)
        now = self._clock()
        self._expire(now)
        if self._wanted or len(self._tokens) < n or self._tokens[n - 1] > now:
            return False  # callers already waiting go first
        for _ in range(n):
            self._tokens.popleft()
        self._note_demand(n, now)
        return True

    async def acquire(self, n: int = 1, *, max_wait: float | None = None) -> float:
        """Take ``n`` tokens of the fleet's bucket, waiting until they are valid;
        returns the seconds waited.

        Raises:
            RetryableError: the wait would exceed ``max_wait`` (the tokens stay with
                this worker for its next callers), or the database cannot be reached
                and no leased token is left.
            ValueError: ``n`` is below 1 or above ``burst``.
        """
        self._check(n)
        if self._store is None or self._lock is None:
            return await self._local.acquire(n, max_wait=max_wait)
        started = self._clock()
        self._note_demand(n, started)
        self.waiting += 1
        self._wanted += n
        counted = True
        try:
            async with self._lock:  # FIFO: callers take tokens in arrival order
                while True:
                    self._expire(self._clock())
                    if len(self._tokens) >= n:
                        break
                    await self._refill(n)
                wait = max(0.0, self._tokens[n - 1] - self._clock())
                if max_wait is not None and wait > max_wait:
                    raise RetryableError(
                        f"rate limit {self.name!r}: a call would wait {wait:.3g}s "
                        f"(max {max_wait:g}s)",
                        retry_after=wait,
                        service=self.name,
                    )
                taken = [self._tokens.popleft() for _ in range(n)]
                self._wanted -= n
                counted = False
                self._prefetch()
            if wait > 0:
                try:
                    await self._sleep(wait)
                except BaseException:
                    # A cancelled caller's tokens stay valid for the next one.
                    self._tokens.extend(taken)
                    self._tokens = deque(sorted(self._tokens))
                    raise
            return self._clock() - started
        finally:
            self.waiting -= 1
            if counted:
                self._wanted -= n

    # -- leasing ---------------------------------------------------------------------
    def _check(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n > self.burst:
            raise ValueError(
                f"rate limit {self.name!r}: cannot take {n!r} tokens from a bucket of {self.burst}"
            )

    def _note_demand(self, n: int, now: float) -> None:
        # An exponentially decaying count: at a steady r tokens/s it settles at r * tau.
        self._demand = self._demand * math.exp(-max(0.0, now - self._demand_at) / _DEMAND_TAU) + n
        self._demand_at = now

    def _want(self, n: int, *, ahead: bool = False) -> int:
        """Tokens the next lease asks for: enough for the callers waiting now and
        about ``horizon`` seconds of recent demand (on top of the stock when leasing
        ahead), within ``horizon`` seconds of the fleet's rate."""
        have = 0 if ahead else len(self._tokens)
        demand = self._demand / _DEMAND_TAU
        target = max(self._wanted, math.ceil(demand * self.horizon))
        cap = max(n, math.ceil(self.rate * self.horizon))
        return max(1, min(max(target - have, n - have), cap, _MAX_LEASE))

    async def _refill(self, n: int) -> None:
        """Wait for a lease (ours, or the one in flight); RetryableError when down."""
        if self._inflight is None or self._inflight.done():
            if self._store is None:
                raise RetryableError(
                    f"fleet rate limit {self.name!r}: the worker has stopped sharing it",
                    retry_after=self.retry_interval,
                    service=self.name,
                )
            if self._clock() < self._down_until:
                raise self._unavailable()
            self._inflight = asyncio.get_running_loop().create_task(
                self._lease(self._want(n)), name=f"worker_core.ratelimit.{self.name}"
            )
        # Shielded: a caller cancelled meanwhile does not waste the tokens being leased.
        await asyncio.shield(self._inflight)
        if self._clock() < self._down_until and len(self._tokens) < n:
            raise self._unavailable()

    def _prefetch(self) -> None:
        """Lease the next batch in the background when callers are queued beyond the
        stock, or once the stock is below ``horizon`` seconds of recent demand: one
        lease stays ahead of the callers, so a slow round trip (or a busy event loop)
        leaves neither them waiting nor the fleet's bucket filling up unused."""
        if self._inflight is not None and not self._inflight.done():
            return
        if self._store is None or self._clock() < self._down_until:
            return
        have = len(self._tokens)
        stock = math.ceil(self._demand / _DEMAND_TAU * self.horizon)
        # Below a stock of 2, leasing ahead would cost a round trip per token anyway.
        if self._wanted > have or (stock >= 2 and have < stock):
            self._inflight = asyncio.get_running_loop().create_task(
                self._lease(self._want(1, ahead=True)), name=f"worker_core.ratelimit.{self.name}"
            )

    async def _lease(self, want: int) -> None:
        store = self._store
        if store is None:
            return
        try:
            before = await store.lease(self.name, rate=self.rate, burst=self.burst, want=want)
        except Exception as exc:  # psycopg errors, pool timeouts, the store's timeout
            self._down_until = self._clock() + self.retry_interval
            first = not self._error
            self._error = f"{type(exc).__name__}: {redact_text(str(exc))[:200]}"
            if first:
                self._log.warning(
                    "fleet rate limit unavailable; deferring calls that need new tokens",
                    error=self._error,
                    retry_in=self.retry_interval,
                )
            return
        self._down_until = 0.0
        if self._error:
            self._error = ""
            self._log.info("fleet rate limit available again")
        now = self._clock()
        fresh = [now + max(0.0, (k - before) / self.rate) for k in range(1, want + 1)]
        if self._tokens and self._tokens[-1] > fresh[0]:
            self._tokens = deque(sorted([*self._tokens, *fresh]))
        else:
            self._tokens.extend(fresh)
        self.leases += 1
        self.leased += want

    def _expire(self, now: float) -> None:
        oldest = now - self.token_ttl
        while self._tokens and self._tokens[0] < oldest:
            self._tokens.popleft()
            self.expired += 1

    def _unavailable(self) -> RetryableError:
        retry_after = max(self._down_until - self._clock(), 0.001)
        reason = self._error or "database unavailable"
        return RetryableError(
            f"fleet rate limit {self.name!r}: cannot lease tokens ({reason})",
            retry_after=retry_after,
            service=self.name,
        )

    def stats(self) -> dict[str, Any]:
        """Leases, tokens leased and tokens dropped unused so far."""
        return {"leases": self.leases, "leased": self.leased, "expired": self.expired}

    def __repr__(self) -> str:
        return f"FleetBucket({self.name!r}, rate={self.rate:g}, burst={self.burst})"
