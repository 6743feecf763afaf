"""Maintenance: the periodic tasks of a running worker.

- heartbeat: every ``queue.heartbeat_seconds`` one statement renews every lease
  the worker holds, by (job id, lease token); a lease found gone stops its run;
- rescue: at start-up and every ``lease_seconds / 2`` (at most 30 s) any worker
  returns the jobs of dead or hung workers (``Queue.rescue_expired``);
- prune: finished jobs past retention, in batches, one worker at a time;
- vacuum: the jobs table once it holds ``maintenance.vacuum_dead_rows`` dead rows.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

from .config import WorkerConfig
from .jobs import JobStatus
from .logs import StructuredLogger
from .metrics import ProcessingMetrics
from .queue import Queue
from .redact import redact_text

__all__ = ["Maintenance"]

Leases = Callable[[], list[tuple[int, str]]]


class Maintenance:
    """Heartbeat, rescue, prune and vacuum against one Queue."""

    def __init__(
        self,
        queue: Queue,
        config: WorkerConfig,
        metrics: ProcessingMetrics,
        logger: StructuredLogger,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._queue = queue
        self._config = config
        self._metrics = metrics
        self._logger = logger
        self._rng = rng or random.Random()
        self._may_not_vacuum = False  # the role does not own the jobs table

    # -- leases ----------------------------------------------------------------------
    async def heartbeat_loop(
        self,
        leases: Leases,
        lost: Callable[[set[str]], None],
        rescued: Callable[[], None],
    ) -> None:
        """Renew leases every heartbeat; rescue expired ones every ``lease / 2``."""
        queue_cfg = self._config.queue
        rescue_every = max(min(queue_cfg.lease_seconds / 2, 30.0), queue_cfg.heartbeat_seconds)
        last_rescue = time.monotonic()
        while True:
            await asyncio.sleep(queue_cfg.heartbeat_seconds)
            try:
                await self.heartbeat(leases, lost)
                if time.monotonic() - last_rescue >= rescue_every:
                    last_rescue = time.monotonic()
                    if await self.rescue():
                        rescued()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._logger.warning(
                    "heartbeat failed", error=redact_text(str(exc)), error_type=type(exc).__name__
                )

    async def heartbeat(self, leases: Leases, lost: Callable[[set[str]], None]) -> None:
        """One heartbeat: renew ``leases()``; report the tokens no longer held."""
        held = leases()
        if not held:
            return
        renewed = await self._queue.heartbeat(held, lease_seconds=self._config.queue.lease_seconds)
        gone = {token for _, token in held if token not in renewed}
        if gone:
            lost(gone)

    async def rescue(self) -> int:
        """Return expired leases of any worker to queued (or dead); returns how many."""
        rescued = await self._queue.rescue_expired()
        if rescued:
            dead = sum(1 for _, _, status in rescued if status is JobStatus.DEAD)
            self._metrics.jobs_rescued(len(rescued))
            self._logger.warning(
                "rescued jobs with expired leases",
                rescued=len(rescued),
                dead=dead,
                job_ids=[job_id for job_id, _, _ in rescued[:20]],
            )
        return len(rescued)

    # -- the jobs table ----------------------------------------------------------------
    async def prune_loop(self) -> None:
        settings = self._config.maintenance
        if settings.retention_seconds is not None or settings.dead_retention_seconds is not None:
            await self._every(settings.interval, self.prune, "pruning finished jobs failed")

    async def vacuum_loop(self) -> None:
        settings = self._config.maintenance
        if settings.vacuum_dead_rows is not None:
            await self._every(
                settings.vacuum_check_interval, self.vacuum, "vacuuming the jobs table failed"
            )

    async def _every(
        self, interval: float, action: Callable[[], Awaitable[object]], failed: str
    ) -> None:
        """Run ``action`` every ``interval`` seconds until cancelled; a failure is
        logged and retried at the next tick."""
        # Start at a random point of the interval so a fleet started together spreads out.
        await asyncio.sleep(interval * self._rng.random())
        while True:
            try:
                await action()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._logger.warning(
                    failed, error=redact_text(str(exc)), error_type=type(exc).__name__
                )
            await asyncio.sleep(interval)

    async def vacuum(self) -> int | None:
        """VACUUM the jobs table if it holds ``maintenance.vacuum_dead_rows`` dead rows
        or more and no other worker is vacuuming it; returns the dead rows or None."""
        threshold = self._config.maintenance.vacuum_dead_rows
        if threshold is None or self._may_not_vacuum:
            return None
        started = time.monotonic()
        try:
            dead_rows = await self._queue.vacuum(min_dead_rows=threshold)
        except PermissionError as exc:
            self._may_not_vacuum = True
            self._logger.warning(
                "not vacuuming the jobs table: leaving it to autovacuum", reason=str(exc)
            )
            return None
        if dead_rows is not None:
            self._metrics.table_vacuumed()
            self._logger.info(
                "vacuumed the jobs table",
                dead_rows=dead_rows,
                seconds=round(time.monotonic() - started, 3),
            )
        return dead_rows

    async def prune(self, *, max_batches: int | None = None) -> int:
        """Delete finished jobs past retention in batches of ``maintenance.batch_size``
        until caught up (or ``max_batches`` batches); returns the rows deleted.

        Not capped by default: a fleet finishing more jobs per interval than a
        fixed number of batches would otherwise grow the table without end.
        """
        settings = self._config.maintenance
        total = 0
        batches = 0
        while max_batches is None or batches < max_batches:
            batches += 1
            deleted = await self._queue.prune(
                retention_seconds=settings.retention_seconds,
                dead_retention_seconds=settings.dead_retention_seconds,
                limit=settings.batch_size,
            )
            total += deleted
            if deleted < settings.batch_size:
                break
        if total:
            self._metrics.jobs_pruned(total)
            self._logger.info("pruned finished jobs", deleted=total)
        return total
