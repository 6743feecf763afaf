"""The completer: writes outcomes in batches, and no bad outcome holds up the others.

One write is in flight at a time; the next takes everything that arrived
meanwhile (up to ``queue.flush_max``), after ``queue.flush_interval`` if set
(group commit). Outcomes of one run coalesce by lease token (a completion
supersedes a checkpoint); two runs of one job never do.

A write that fails on the connection (the database restarting, a pool timeout)
is retried with backoff: those heal. Any other failure is about the data: the
batch is split in halves until the outcome that cannot be written is alone; that
job is dead-lettered with an error saying why its result could not be stored,
and the rest are written. No job stays ``running`` because of another job.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence

import psycopg

from .logs import StructuredLogger
from .metrics import ProcessingMetrics
from .outcomes import Outcome, bury_unstorable
from .queue import Queue
from .redact import redact_text

__all__ = ["Completer", "heals"]

_FIRST_DELAY = 0.05
_MAX_DELAY = 5.0


def heals(exc: BaseException) -> bool:
    """True for failures of the connection or the server that retrying can outlast;
    False for failures caused by the data written (which retrying only repeats)."""
    if isinstance(exc, psycopg.errors.ProgramLimitExceeded):
        return False  # a value too large for the server: the data, not the connection
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError)


class Completer:
    """Batches fenced outcome writes for one run of a worker."""

    def __init__(
        self,
        queue: Queue,
        *,
        flush_interval: float,
        flush_max: int,
        metrics: ProcessingMetrics,
        logger: StructuredLogger,
        worker_id: str,
        secrets: Sequence[str] = (),
        rng: random.Random | None = None,
    ) -> None:
        self._queue = queue
        self._interval = flush_interval
        self._max = flush_max
        self._metrics = metrics
        self._logger = logger
        self._worker_id = worker_id
        self._secrets = tuple(secrets)
        self._rng = rng or random.Random()
        self._pending: dict[str, Outcome] = {}
        self._waiters: dict[str, list[asyncio.Future[bool]]] = {}
        self._buried: set[str] = set()
        self._has_items = asyncio.Event()
        self._full = asyncio.Event()
        self._lock = asyncio.Lock()

    def submit(self, outcome: Outcome, *, wait: bool = False) -> asyncio.Future[bool] | None:
        """Queue ``outcome`` for the next write; with ``wait``, a future that says
        whether it was written as submitted (False: the lease was lost, or it could
        not be stored and the job was dead-lettered instead)."""
        self._pending[outcome.token] = outcome
        future: asyncio.Future[bool] | None = None
        if wait:
            future = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(outcome.token, []).append(future)
        self._has_items.set()
        if len(self._pending) >= self._max:
            self._full.set()
        return future

    def pending_leases(self) -> list[tuple[int, str]]:
        """``(job id, token)`` of outcomes not written yet: their leases must live on."""
        return [(o.job_id, o.token) for o in self._pending.values()]

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        """Outcomes waiting, or a write in flight (those jobs are still running in the DB)."""
        return bool(self._pending) or self._lock.locked()

    async def run(self) -> None:
        while True:
            await self._has_items.wait()
            if not self._interval:
                # Group commit: let the jobs finishing in this loop turn submit too;
                # whatever arrives while this write is in flight goes in the next one.
                await asyncio.sleep(0)
            elif not self._full.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._full.wait()
            await self.flush()

    async def flush(self) -> None:
        """Write everything pending; on a connection error retry until it is written."""
        async with self._lock:
            delay = _FIRST_DELAY
            while self._pending:
                batch = list(self._pending.values())[: self._max]
                for outcome in batch:
                    del self._pending[outcome.token]
                self._update_events()
                written: set[str] = set()
                try:
                    await self._write(batch, written)
                except Exception as exc:
                    for outcome in batch:  # keep what was not written, unless superseded
                        if outcome.token not in written:
                            self._pending.setdefault(outcome.token, outcome)
                    self._settle([o for o in batch if o.token in written], written)
                    self._update_events()
                    self._logger.warning(
                        "outcome write failed; retrying",
                        error=redact_text(str(exc), self._secrets),
                        error_type=type(exc).__name__,
                        pending=len(self._pending),
                        retry_in=round(delay, 3),
                    )
                    await asyncio.sleep(delay * (0.5 + self._rng.random()))
                    delay = min(delay * 2, _MAX_DELAY)
                    continue
                delay = _FIRST_DELAY
                self._settle(batch, written)

    def _update_events(self) -> None:
        if self._pending:
            self._has_items.set()
        else:
            self._has_items.clear()
        if len(self._pending) < self._max:
            self._full.clear()

    async def _write(self, batch: list[Outcome], written: set[str]) -> None:
        """Write ``batch``, adding the tokens written to ``written``; isolate outcomes
        that cannot be stored. Raises only errors that ``heals``."""
        try:
            written |= await self._queue.finish(batch)
            return
        except Exception as exc:
            if heals(exc):
                raise
            failure = exc
        if len(batch) == 1:
            await self._bury(batch[0], failure)
            return
        middle = len(batch) // 2
        await self._write(batch[:middle], written)
        await self._write(batch[middle:], written)

    async def _bury(self, outcome: Outcome, failure: Exception) -> None:
        reason = redact_text(f"{type(failure).__name__}: {failure}", self._secrets)
        self._logger.error(
            "outcome could not be stored; dead-lettering the job instead",
            job_id=outcome.job_id,
            outcome=outcome.event.value,
            error=reason[:500],
        )
        dead = bury_unstorable(outcome, failure, worker_id=self._worker_id, secrets=self._secrets)
        try:
            done = await self._queue.finish([dead])
        except Exception as exc:
            if heals(exc):
                raise
            self._logger.error(
                "could not dead-letter the job either; its lease will expire and rescue "
                "will retry it",
                job_id=outcome.job_id,
                error=redact_text(f"{type(exc).__name__}: {exc}", self._secrets)[:500],
            )
            return
        if dead.token in done:
            self._buried.add(dead.token)
            self._metrics.outcome_unstorable()

    def _settle(self, batch: list[Outcome], written: set[str]) -> None:
        for outcome in batch:
            ok = outcome.token in written
            for future in self._waiters.pop(outcome.token, ()):
                if not future.done():
                    future.set_result(ok)
            if ok or outcome.token in self._pending:
                continue
            if outcome.token in self._buried:
                self._buried.discard(outcome.token)
                continue
            self._metrics.lease_lost()
            self._logger.warning(
                "outcome rejected: lease lost (the job was rescued, maybe claimed again)",
                job_id=outcome.job_id,
                attempt=outcome.attempt,
                outcome=outcome.event.value,
            )

    def fail_waiters(self) -> None:
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(False)
        self._waiters.clear()
