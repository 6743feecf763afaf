"""State the fleet shares through PostgreSQL besides the jobs: breakers, schedule
slots and rate-limit tokens (FleetStore, ScheduleStore, TokenLeaseStore).

A ``FleetStore`` shares the state of its breakers with every worker of a schema
through the ``{schema}.breakers`` table (migration 0002; queries in
``sql/breakers.sql``), with no server besides PostgreSQL. Failures are counted
fleet-wide, a trip opens the circuit for every worker, and one guarded UPDATE hands
out the single trial permit of a circuit due for a probe.

pybreaker's storage interface is synchronous, so the database cannot sit behind it
in an asyncio worker. Instead each ``CircuitBreaker`` keeps deciding admission from
its local pybreaker state, and the store keeps that state in step, asynchronously:
a cached read of all rows before admitting calls (at most every ``sync_interval``
seconds, or on every call while a closed circuit is recording failures), one write
after each failure, trip, close and claim, and ``CircuitBreaker.apply_fleet_row``
folds each returned row back in. Times are computed on the database clock and travel as
"seconds from now", so hosts whose clocks disagree still agree.

A database error never fails a call: the store logs one warning, answers ``None``
(the breaker then goes by its local state) and stays local for ``retry_interval``.

``ScheduleStore`` and ``TokenLeaseStore`` run the named queries of
``sql/schedules.sql`` and ``sql/limits.sql`` for ``worker_core.schedules`` and
``worker_core.fleetlimit``; their callers decide what a database error means.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from .logs import StructuredLogger
from .queue import breaker_channel_name
from .redact import redact_text
from .sql import load_queries, render

if TYPE_CHECKING:
    from psycopg import AsyncConnection

    from .breaker import CircuitBreaker

__all__ = ["Database", "FleetRow", "FleetStore", "ScheduleStore", "TokenLeaseStore"]

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class FleetRow:
    """One breaker's shared state as a query returned it."""

    name: str
    state: str  # "closed" or "open"
    failures: int
    generation: int
    #: Seconds until the circuit may be probed, on the database clock (0 when due).
    remaining: float
    #: This store holds the live trial permit.
    mine: bool
    #: The statement changed the row (tripped, closed or claimed the permit).
    changed: bool


class Database(Protocol):
    """What FleetStore needs of a ``worker_core.queue.Queue``."""

    @property
    def schema(self) -> str: ...

    def connection(self) -> AbstractAsyncContextManager[AsyncConnection[Any]]: ...


class FleetStore:
    """Breaker state shared by every worker of a schema (opt-in per breaker).

    Args:
        owner: identifies this store's trial permits (default: host, pid and a random tag).
        clock: as for CircuitBreaker.
        sync_interval: the longest a cached read is trusted before admitting a call.
        db_timeout: seconds any one database round trip may take before falling back.
        retry_interval: after a database error, local state only for this long.
        trial_lease: how long a trial permit lasts unless its holder reports (default:
            the breaker's reset timeout, at least 30 s), so a dead worker cannot keep it.
    """

    def __init__(
        self,
        *,
        owner: str | None = None,
        clock: Clock | None = None,
        sync_interval: float = 0.25,
        db_timeout: float = 2.0,
        retry_interval: float = 5.0,
        trial_lease: float | None = None,
    ) -> None:
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.sync_interval = sync_interval
        self.db_timeout = db_timeout
        self.retry_interval = retry_interval
        self.trial_lease = trial_lease
        self._clock: Clock = clock or time.monotonic
        self._db: Database | None = None
        #: Where trips are announced (the worker's LISTEN connection hears them).
        self.channel = ""
        self._sql: dict[str, bytes] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._ensured: set[str] = set()
        self._lock: asyncio.Lock | None = None
        self._fetches = 0
        self._fetched_at: float | None = None
        self._down_until = 0.0
        self._degraded = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = StructuredLogger("worker_core.breaker")

    @property
    def active(self) -> bool:
        """True between ``attach`` and ``detach``."""
        return self._db is not None

    def register(self, breaker: CircuitBreaker) -> None:
        known = self._breakers.get(breaker.name)
        if known is not None and known is not breaker:
            raise ValueError(f"a breaker named {breaker.name!r} already uses this store")
        self._breakers[breaker.name] = breaker

    async def attach(self, db: Database) -> None:
        """Start sharing state through ``db`` (a Queue) and read the current state."""
        self._db = db
        self.channel = breaker_channel_name(db.schema)
        self._sql = _queries("breakers.sql", db.schema)
        self._ensured.clear()
        self._lock = asyncio.Lock()  # a Lock belongs to one event loop; run() may use another
        self._fetched_at = None
        self._down_until = 0.0
        await self.refresh(max_age=0.0)

    async def detach(self) -> None:
        """Give back this store's trial permits and stop using the database."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.db_timeout)
            for task in set(self._tasks):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._db is not None:
            await self._execute("release_owner", {"owner": self.owner}, ())
        self._db = None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a best-effort write in the background (from code that must not await)."""
        if self._db is None:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro, name="worker_core.breaker.sync")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def refresh(self, *, max_age: float | None = None) -> None:
        """Read every registered breaker's row unless the last read is younger than
        ``max_age`` (default ``sync_interval``); concurrent callers share one read."""
        if self._db is None or not self._breakers or self._lock is None:
            return
        limit = self.sync_interval if max_age is None else max_age
        if self._fresh(limit):
            return
        ticket = self._fetches
        async with self._lock:
            if self._fetches > ticket or (limit > 0 and self._fresh(limit)):
                return  # a read that started after we asked has finished
            self._fetches += 1
            self._fetched_at = self._clock()
            names = list(self._breakers)
            rows = await self._execute("fetch", {"names": names, "owner": self.owner}, names)
        for row in rows or ():
            breaker = self._breakers.get(row.name)
            if breaker is not None:
                breaker.apply_fleet_row(row)

    def _fresh(self, limit: float) -> bool:
        return self._fetched_at is not None and self._clock() - self._fetched_at < limit

    async def record_failure(self, breaker: CircuitBreaker, *, trip: bool) -> FleetRow | None:
        params = self._params(breaker, trip=trip, fail_max=breaker.fail_max)
        params["reset_timeout"] = breaker.reset_timeout
        params["channel"] = self.channel
        return self._one(breaker, await self._execute("record_failure", params, [breaker.name]))

    async def record_success(self, breaker: CircuitBreaker, *, trial: bool) -> FleetRow | None:
        params = self._params(breaker, trial=trial)
        return self._one(breaker, await self._execute("record_success", params, [breaker.name]))

    async def claim_trial(self, breaker: CircuitBreaker) -> FleetRow | None:
        lease = self.trial_lease or max(breaker.reset_timeout, 30.0)
        params = self._params(breaker, lease=lease)
        return self._one(breaker, await self._execute("claim_trial", params, [breaker.name]))

    async def release_trial(self, breaker: CircuitBreaker) -> None:
        await self._execute("release_trial", self._params(breaker), [breaker.name])

    def _params(self, breaker: CircuitBreaker, **extra: Any) -> dict[str, Any]:
        return {"name": breaker.name, "owner": self.owner, **extra}

    def _one(self, breaker: CircuitBreaker, rows: list[FleetRow] | None) -> FleetRow | None:
        if rows is not None and not rows:
            self._ensured.discard(breaker.name)  # deleted by an operator: recreate next time
        return rows[0] if rows else None

    async def _execute(
        self, query: str, params: dict[str, Any], names: Sequence[str]
    ) -> list[FleetRow] | None:
        """Run one named query; None (and a warning, once) when the database fails."""
        db = self._db
        if db is None or self._clock() < self._down_until:
            return None
        try:
            async with asyncio.timeout(self.db_timeout), db.connection() as conn:
                missing = [n for n in names if n not in self._ensured]
                if missing:
                    await conn.execute(self._sql["ensure"], {"names": missing})
                cur = await conn.execute(self._sql[query], params)
                raw = await cur.fetchall() if cur.description else []
                self._ensured.update(missing)
        except Exception as exc:  # psycopg errors, pool timeouts, our own timeout
            self._down_until = self._clock() + self.retry_interval
            if not self._degraded:
                self._degraded = True
                self._log.warning(
                    "fleet breaker state unavailable; using local state",
                    query=query,
                    error_type=type(exc).__name__,
                    error=redact_text(str(exc))[:300],
                    retry_in=self.retry_interval,
                )
            return None
        if self._degraded:
            self._degraded = False
            self._log.info("fleet breaker state available again")
        return [
            FleetRow(r[0], r[1], int(r[2]), int(r[3]), float(r[4]), bool(r[5]), bool(r[6]))
            for r in raw
        ]


def _queries(filename: str, schema: str) -> dict[str, bytes]:
    return {
        name: render(text, schema).as_bytes(None) for name, text in load_queries(filename).items()
    }


class ScheduleStore:
    """The schedule rows (``sql/schedules.sql``): last fired slots and the slot
    compare-and-set. Errors propagate: the runner logs them and ticks again."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._sql = _queries("schedules.sql", db.schema)
        self._ensured: set[str] = set()

    async def read(
        self, names: Sequence[str], *, since: datetime | None = None
    ) -> tuple[datetime, dict[str, datetime]]:
        """The database clock and each schedule's last slot; a schedule seen for
        the first time is created starting at ``since`` (default: the database clock)."""
        async with self._db.connection() as conn:
            missing = [n for n in names if n not in self._ensured]
            if missing:
                await conn.execute(self._sql["ensure"], {"names": missing, "since": since})
            cur = await conn.execute(self._sql["fetch"], {"names": list(names)})
            rows = await cur.fetchall()
        self._ensured.update(missing)
        last = {r[1]: r[2] for r in rows if r[1] is not None}
        self._ensured.intersection_update(last)  # a deleted row is created again
        return rows[0][0], last

    async def advance(
        self, conn: AsyncConnection[Any], name: str, seen: datetime, slot: datetime
    ) -> bool:
        """Move ``name``'s last slot from ``seen`` to ``slot``; False if it had moved."""
        cur = await conn.execute(self._sql["advance"], {"name": name, "seen": seen, "slot": slot})
        return await cur.fetchone() is not None

    async def fired(self, conn: AsyncConnection[Any], name: str, job_id: int) -> None:
        await conn.execute(self._sql["fired"], {"name": name, "job_id": job_id})

    async def rows(self) -> list[dict[str, Any]]:
        """Every schedule row, for operators."""
        async with self._db.connection() as conn:
            cur = await conn.execute(self._sql["list"])
            keys = [c.name for c in cur.description or ()]
            return [dict(zip(keys, r, strict=True)) for r in await cur.fetchall()]


class TokenLeaseStore:
    """The fleet's token buckets (``sql/limits.sql``). Errors, and round trips
    longer than ``timeout`` seconds, propagate to the caller."""

    def __init__(self, db: Database, *, timeout: float = 2.0) -> None:
        self._db = db
        self._sql = _queries("limits.sql", db.schema)
        self.timeout = timeout
        #: Round trips made (lease and give_back), for benchmarks and tests.
        self.round_trips = 0

    async def lease(self, name: str, *, rate: float, burst: int, want: int) -> float:
        """Take ``want`` tokens; returns the bucket's balance before (see limits.sql)."""
        params = {"name": name, "rate": float(rate), "burst": int(burst), "want": int(want)}
        self.round_trips += 1
        async with asyncio.timeout(self.timeout), self._db.connection() as conn:
            cur = await conn.execute(self._sql["lease"], params)
            row = await cur.fetchone()
        assert row is not None
        return float(row[0])

    async def give_back(self, name: str, n: int) -> None:
        """Return ``n`` leased tokens that will not be used."""
        self.round_trips += 1
        async with asyncio.timeout(self.timeout), self._db.connection() as conn:
            await conn.execute(self._sql["give_back"], {"name": name, "n": int(n)})
