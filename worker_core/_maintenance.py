"""Maintenance: the periodic tasks of a running worker.

- heartbeat: every ``queue.heartbeat_seconds`` one statement renews every lease
  the worker holds, by (job id, lease token); a lease found gone stops its run,
  and so does a cancel request found on a lease (should its NOTIFY be missed);
- paused queues: read at start, whenever LISTEN (re)connects, and every
  ``queue.poll_interval`` while it is down (the NOTIFY of a pause is then missed);
- rescue: at start-up and every ``lease_seconds / 2`` (at most 30 s) any worker
  returns the jobs of dead or hung workers (``Queue.rescue_expired``);
- prune: finished jobs past retention, in batches, one worker at a time;
- vacuum: the jobs table once it holds ``maintenance.vacuum_dead_rows`` dead rows;
  analyze: once it has grown to ``maintenance.analyze_growth_factor`` times its
  size at its last VACUUM or ANALYZE (so every session plans its statements again);
- reindex: the claim indexes, each rebuilt concurrently once it has grown to
  ``maintenance.reindex_claim_index_factor`` times what its entries need, one
  worker of the fleet at a time (a lease row, so it works through PgBouncer);
- console: the metrics history flush, the workers-registry refresh and the alert
  evaluator (``worker_core.console``), each off when not configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from psycopg import sql

from .config import WorkerConfig
from .jobs import JobStatus
from .logs import StructuredLogger
from .metrics import ProcessingMetrics
from .queue import Queue
from .redact import redact_text

if TYPE_CHECKING:
    from .console import WorkerConsole

__all__ = ["Maintenance"]

Leases = Callable[[], list[tuple[int, str]]]

#: The indexes claims read: by queue, and by queue and kind (a worker with pipelines()).
CLAIM_INDEXES = ("jobs_claim_idx", "jobs_claim_kind_idx")
#: A claim index is rebuilt only past this size (a small index costs nothing).
REINDEX_MIN_BYTES = 1 << 20
#: What one entry of a claim index needs on a freshly built index (a key of queue,
#: (kind,) priority, run_at and id, the tuple header and line pointer, fillfactor
#: 90): the yardstick for "this many times the size its entries need".
CLAIM_INDEX_ENTRY_BYTES = 64
#: The fleet-wide lease a rebuild holds (renewed while it runs); a worker that dies
#: mid-rebuild frees it after this long, and the next rebuild drops its leftovers.
REINDEX_LEASE = "reindex_claim_index"
REINDEX_LEASE_SECONDS = 300.0


class Maintenance:
    """Heartbeat, rescue, prune, vacuum and analyze against one Queue."""

    def __init__(
        self,
        queue: Queue,
        config: WorkerConfig,
        metrics: ProcessingMetrics,
        logger: StructuredLogger,
        *,
        console: WorkerConsole | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._queue = queue
        self._console = console
        self._config = config
        self._metrics = metrics
        self._logger = logger
        self._rng = rng or random.Random()
        #: What this role may not do to the jobs table (it does not own it).
        self._not_owner: set[str] = set()
        self._may_not_reindex = False
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._reread_paused = asyncio.Event()
        self._beat_now = asyncio.Event()

    # -- leases ----------------------------------------------------------------------
    async def heartbeat_loop(
        self,
        leases: Leases,
        lost: Callable[[set[str]], None],
        rescued: Callable[[], None],
        cancelled: Callable[[set[str]], None] | None = None,
    ) -> None:
        """Renew leases every heartbeat; rescue expired ones every ``lease / 2``."""
        queue_cfg = self._config.queue
        rescue_every = max(min(queue_cfg.lease_seconds / 2, 30.0), queue_cfg.heartbeat_seconds)
        last_rescue = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(queue_cfg.heartbeat_seconds):
                    await self._beat_now.wait()
            self._beat_now.clear()
            try:
                await self.heartbeat(leases, lost, cancelled)
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

    async def heartbeat(
        self,
        leases: Leases,
        lost: Callable[[set[str]], None],
        cancelled: Callable[[set[str]], None] | None = None,
    ) -> None:
        """One heartbeat: renew ``leases()``; report the tokens no longer held, and
        those whose job an operator asked to cancel."""
        held = leases()
        if not held:
            return
        renewed = await self._queue.renew_leases(
            held, lease_seconds=self._config.queue.lease_seconds
        )
        gone = {token for _, token in held if token not in renewed}
        if gone:
            lost(gone)
        asked = {token for token, cancel in renewed.items() if cancel}
        if asked and cancelled is not None:
            cancelled(asked)

    # -- paused queues -------------------------------------------------------------
    def listen_connected(self) -> None:
        """LISTEN is (again) up: what was announced before it was may be lost, so read
        the paused queues and renew the leases now (the renewal reports the cancel
        requests of running jobs) instead of at the next poll or heartbeat."""
        self._reread_paused.set()
        self._beat_now.set()

    async def read_paused(self, apply: Callable[[list[str], bool], None]) -> bool:
        """Tell ``apply`` which of the worker's queues are paused and which are not;
        False (logged) when they could not be read."""
        names = set(self._config.queue.names)
        self._reread_paused.clear()  # what this read sees covers any earlier sign
        try:
            paused = set(await self._queue.paused()) & names
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._logger.warning(
                "reading paused queues failed",
                error=redact_text(str(exc)),
                error_type=type(exc).__name__,
            )
            return False
        apply(sorted(paused), True)
        apply(sorted(names - paused), False)
        return True

    async def paused_loop(
        self,
        listening: Callable[[], bool],
        apply: Callable[[list[str], bool], None],
        *,
        read_first: bool = True,
    ) -> None:
        """Tell ``apply`` which of the worker's queues are paused and which are not:
        at start (unless ``read_first`` is False: the caller has just read them), after
        ``listen_connected()``, and every poll interval while not ``listening()``."""
        skip, read = not read_first, True
        while True:
            if not skip:
                read = await self.read_paused(apply)
            skip = False
            while True:
                try:
                    async with asyncio.timeout(self._config.queue.poll_interval):
                        await self._reread_paused.wait()
                    break
                except TimeoutError:
                    if not listening() or not read:  # a failed read is tried again
                        break

    async def rescue(self) -> int:
        """Return expired leases of any worker to queued (or dead, or cancelled when a
        cancel was requested); returns how many."""
        rescued = await self._queue.rescue_expired()
        if rescued:
            dead = sum(1 for _, _, status in rescued if status is JobStatus.DEAD)
            cancelled = sum(1 for _, _, status in rescued if status is JobStatus.CANCELLED)
            self._metrics.jobs_rescued(len(rescued))
            self._logger.warning(
                "rescued jobs with expired leases",
                rescued=len(rescued),
                dead=dead,
                cancelled=cancelled,
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
        if settings.vacuum_dead_rows is not None or settings.analyze_growth_factor is not None:
            await self._every(
                settings.vacuum_check_interval,
                self.look_after_table,
                "vacuuming or analyzing the jobs table failed",
            )

    async def look_after_table(self) -> None:
        """VACUUM the jobs table if it is due; if not, ANALYZE it if it is due (a
        VACUUM records its pages too, and makes every session plan again as well).
        One look at the table decides both."""
        settings = self._config.maintenance
        await self._look_after(settings.vacuum_dead_rows, settings.analyze_growth_factor)

    async def reindex_loop(self, *, look_now: bool = True) -> None:
        """Rebuild bloated claim indexes (``reindex``) every check interval; the first
        look at once, unless ``look_now`` is False (``claim_indexes_bloated`` was
        just asked at start-up and said no)."""
        settings = self._config.maintenance
        if settings.reindex_claim_index_factor is not None:
            if not look_now:
                await asyncio.sleep(settings.reindex_check_interval)
            # Otherwise the first look at start-up, not at a random point of the
            # interval: a worker started on an aged table rebuilds before its first
            # claims pile up (the lease keeps a fleet started together to one rebuild).
            await self._every(
                settings.reindex_check_interval,
                self.reindex,
                "rebuilding the claim index failed",
                spread=False,
            )

    async def _every(
        self,
        interval: float,
        action: Callable[[], Awaitable[object]],
        failed: str,
        *,
        spread: bool = True,
    ) -> None:
        """Run ``action`` every ``interval`` seconds until cancelled; a failure is
        logged and retried at the next tick."""
        if spread:
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

    # -- the operations console -------------------------------------------------------
    async def history_loop(self) -> None:
        """Write the per-minute metrics rollups every ``history.flush_seconds``."""
        if self._console is not None and self._config.history.enabled:
            await self._console.flush_loop(self._queue)

    async def registry_loop(self) -> None:
        """Refresh this worker's row in the workers registry every heartbeat."""
        if self._console is not None:
            await self._console.registry.run(self._queue)

    async def alerts_loop(self) -> None:
        """Evaluate the alert rules (one worker of the fleet at a time holds the lease)."""
        if self._console is not None and self._console.alerts.enabled:
            await self._console.alerts.run(self._queue)

    async def vacuum(self) -> int | None:
        """VACUUM the jobs table if it holds ``maintenance.vacuum_dead_rows`` dead rows
        or more and no other worker is vacuuming it; returns the dead rows or None."""
        return await self._look_after(self._config.maintenance.vacuum_dead_rows, None)

    async def analyze(self) -> int | None:
        """ANALYZE the jobs table once it has grown to
        ``maintenance.analyze_growth_factor`` times its size at its last VACUUM or
        ANALYZE, the smallest any session's cached plans were made for
        (``Queue.analyze``); returns its pages when it did, else None."""
        return await self._look_after(None, self._config.maintenance.analyze_growth_factor)

    async def _look_after(self, min_dead_rows: int | None, growth: float | None) -> int | None:
        """VACUUM if ``min_dead_rows`` is due, else ANALYZE if ``growth`` is (None: not
        asked); returns the dead rows or pages of what ran. A role that may not (it
        does not own the table) is told once, and leaves both to autovacuum."""
        if "vacuuming" in self._not_owner:
            min_dead_rows = None
        if "analyzing" in self._not_owner:
            growth = None
        if min_dead_rows is None and growth is None:
            return None
        started = time.monotonic()
        try:
            done = await self._queue._look_after_table(min_dead_rows=min_dead_rows, growth=growth)
        except PermissionError as exc:
            for doing, asked in (("vacuuming", min_dead_rows), ("analyzing", growth)):
                if asked is not None:
                    self._not_owner.add(doing)
                    self._logger.warning(
                        f"not {doing} the jobs table: leaving it to autovacuum", reason=str(exc)
                    )
            return None
        if done is None:
            return None
        command, found = done
        seconds = round(time.monotonic() - started, 3)
        if command == "VACUUM":
            self._metrics.table_vacuumed()
            self._logger.info("vacuumed the jobs table", dead_rows=found, seconds=seconds)
        else:
            self._metrics.table_analyzed()
            self._logger.info(
                "analyzed the jobs table: it outgrew the plans of its statements",
                pages=found,
                seconds=seconds,
            )
        return found

    async def claim_indexes_bloated(self) -> dict[str, tuple[int, float]]:
        """The claim indexes ``reindex`` would rebuild now: ``{index: (bytes, live
        entries)}`` (empty: none, or rebuilding is off or not allowed to this role)."""
        factor = self._config.maintenance.reindex_claim_index_factor
        if factor is None or self._may_not_reindex:
            return {}
        bloated: dict[str, tuple[int, float]] = {}
        for index in CLAIM_INDEXES:
            size = await self._index_size(index)
            if size is None:
                continue
            before, entries, may_reindex = size
            if before < max(REINDEX_MIN_BYTES, factor * entries * CLAIM_INDEX_ENTRY_BYTES):
                continue
            if not may_reindex:
                self._may_not_reindex = True
                self._logger.warning(
                    "not rebuilding the claim indexes: this role does not own the jobs table"
                )
                return {}
            bloated[index] = (before, entries)
        if bloated:
            # reltuples is an estimate as of the last VACUUM or ANALYZE: on a table
            # never analyzed, or grown since, a healthy index looks bloated. Count.
            per_entry = factor * CLAIM_INDEX_ENTRY_BYTES
            enough = max(before for before, _ in bloated.values()) // per_entry + 1
            entries = float(await self._queued_count(int(enough)))
            bloated = {
                index: (before, entries)
                for index, (before, _) in bloated.items()
                if before >= max(REINDEX_MIN_BYTES, per_entry * entries)
            }
        return bloated

    async def reindex(self) -> dict[str, tuple[int, int]]:
        """Rebuild each claim index (``CLAIM_INDEXES``, ``REINDEX INDEX
        CONCURRENTLY``) that is ``maintenance.reindex_claim_index_factor`` times the
        size its live entries need and over ``REINDEX_MIN_BYTES``, unless another
        worker is rebuilding; returns the size in bytes before and after of each
        index rebuilt (empty: none).

        Why: VACUUM removes the dead entries of claimed jobs but gives an index page
        back only once it is empty, and a claim scan starts at the end where the
        oldest jobs were. Concurrently: claims and outcome writes go on meanwhile.
        One worker at a time through a lease row (not an advisory lock: REINDEX
        CONCURRENTLY cannot run in a transaction, and a session lock does not
        survive PgBouncer's transaction pooling). Invalid copies left by an
        interrupted rebuild are dropped first.
        """
        bloated = await self.claim_indexes_bloated()
        if not bloated:
            return {}
        queue, schema = self._queue, self._queue.schema
        held, _ = await queue.take_lease(REINDEX_LEASE, self._owner, REINDEX_LEASE_SECONDS)
        if not held:
            return {}
        rebuilt: dict[str, tuple[int, int]] = {}
        renew = asyncio.create_task(self._renew_reindex_lease())
        try:
            async with queue.connection() as conn:
                cur = await conn.execute(queue._sql["claim_index_leftovers"], {"schema": schema})
                for (name,) in await cur.fetchall():
                    self._logger.warning("dropping an interrupted rebuild's index", index=name)
                    await conn.execute(
                        sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}.{}").format(
                            sql.Identifier(schema), sql.Identifier(name)
                        ),
                        prepare=False,
                    )
                for index, (before, entries) in bloated.items():
                    started = time.monotonic()
                    await conn.execute(
                        sql.SQL("REINDEX INDEX CONCURRENTLY {}.{}").format(
                            sql.Identifier(schema), sql.Identifier(index)
                        ),
                        prepare=False,
                    )
                    after = await self._index_size(index)
                    rebuilt[index] = (before, after[0] if after is not None else 0)
                    self._logger.info(
                        "rebuilt a claim index",
                        index=index,
                        bytes_before=before,
                        bytes_after=rebuilt[index][1],
                        entries=int(entries),
                        seconds=round(time.monotonic() - started, 3),
                    )
        finally:
            renew.cancel()
            await asyncio.gather(renew, return_exceptions=True)
            with contextlib.suppress(Exception):
                await queue.release_lease(REINDEX_LEASE, self._owner)
        return rebuilt

    async def _queued_count(self, enough: int) -> int:
        """The queued jobs (the claim indexes' live entries), counted up to ``enough``."""
        async with self._queue.connection() as conn:
            cur = await conn.execute(self._queue._sql["claim_index_entries"], {"enough": enough})
            row = await cur.fetchone()
        return int(row[0]) if row is not None else 0

    async def _index_size(self, index: str) -> tuple[int, float, bool] | None:
        async with self._queue.connection() as conn:
            cur = await conn.execute(
                self._queue._sql["claim_index_size"],
                {"schema": self._queue.schema, "index": index},
            )
            row = await cur.fetchone()
        if row is None:
            return None
        return int(row[0]), float(row[1]), bool(row[2])

    async def _renew_reindex_lease(self) -> None:
        while True:
            await asyncio.sleep(REINDEX_LEASE_SECONDS / 3)
            with contextlib.suppress(Exception):
                await self._queue.take_lease(REINDEX_LEASE, self._owner, REINDEX_LEASE_SECONDS)

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
