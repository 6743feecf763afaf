"""BaseWorker: the claim loop, concurrency, leases, shutdown and hooks.

One worker process runs one dispatcher task that claims up to its free slots in
one statement, one task per job, a flusher that writes outcomes in batches, a
heartbeat task that renews every lease in one statement (and rescues expired
leases of dead workers), and a LISTEN connection that wakes the dispatcher on
enqueue. No connection is held while a stage awaits anything but the database.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import functools
import logging
import os
import random
import secrets
import signal
import socket
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .config import WorkerConfig
from .console import WorkerConsole  # console wiring
from .errors import (
    LeaseLostError,
    PayloadError,
    RetryableError,
    TransientError,
    WorkerCoreError,
)
from .jobs import Job, JobStatus, Transition, dump_json
from .logs import StructuredLogger, job_context
from .metrics import ProcessingMetrics
from .queue import Outcome, Queue, open_pool
from .redact import redact_text, redact_value
from .retry import ErrorKind, backoff, classify, plan_failure
from .sql import migrations
from .stages import Stage, StageContext, state_json, validate_stages

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

    from .breaker import CircuitBreaker
    from .health import HealthReport
    from .ratelimit import RateLimiterRegistry, TokenBucket

__all__ = ["BaseWorker"]

#: Connections the core itself may hold at once: claim, flush, heartbeat/rescue.
CORE_CONNECTIONS = 3
_MAX_MESSAGE = 2000
_MAX_TRACEBACK = 4000


class _Flusher:
    """Batches fenced outcome writes: one write in flight, the next takes all that
    arrived meanwhile (up to ``flush_max``), after an optional ``flush_interval``.

    Outcomes for the same job coalesce (a completion supersedes a checkpoint), and
    a write that fails on a lost connection is kept and retried, never dropped.
    """

    def __init__(self, worker: BaseWorker, queue: Queue) -> None:
        self._worker = worker
        self._queue = queue
        self._interval = worker.config.queue.flush_interval
        self._max = worker.config.queue.flush_max
        self._pending: dict[int, Outcome] = {}
        self._waiters: dict[int, list[asyncio.Future[bool]]] = {}
        self._has_items = asyncio.Event()
        self._full = asyncio.Event()
        self._lock = asyncio.Lock()

    def submit(self, outcome: Outcome, *, wait: bool = False) -> asyncio.Future[bool] | None:
        self._pending[outcome.id] = outcome
        future: asyncio.Future[bool] | None = None
        if wait:
            future = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(outcome.id, []).append(future)
        self._has_items.set()
        if len(self._pending) >= self._max:
            self._full.set()
        return future

    @property
    def pending_ids(self) -> list[int]:
        return list(self._pending)

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
            delay = 0.05
            while self._pending:
                batch = list(self._pending.values())[: self._max]
                for outcome in batch:
                    del self._pending[outcome.id]
                if not self._pending:
                    self._has_items.clear()
                if len(self._pending) < self._max:
                    self._full.clear()
                try:
                    written = await self._queue.finish(self._worker.worker_id, batch)
                except Exception as exc:
                    for outcome in batch:  # keep a newer outcome that arrived meanwhile
                        self._pending.setdefault(outcome.id, outcome)
                    self._has_items.set()
                    self._worker.logger.warning(
                        "outcome write failed; retrying",
                        error=redact_text(str(exc)),
                        error_type=type(exc).__name__,
                        pending=len(self._pending),
                        retry_in=round(delay, 3),
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                delay = 0.05
                self._settle(batch, written)

    def _settle(self, batch: list[Outcome], written: set[int]) -> None:
        for outcome in batch:
            ok = outcome.id in written
            for future in self._waiters.pop(outcome.id, ()):
                if not future.done():
                    future.set_result(ok)
            if not ok and outcome.id not in self._pending:
                self._worker.metrics.lease_lost()
                self._worker.logger.warning(
                    "outcome rejected: lease lost (job was rescued by another worker)",
                    job_id=outcome.id,
                    attempt=outcome.attempt,
                    status=outcome.status.value,
                )

    def fail_waiters(self) -> None:
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(False)
        self._waiters.clear()


class _JobRun:
    """Book-keeping of one attempt of one job inside its task."""

    __slots__ = ("finished", "flusher", "job", "saved_state", "stage", "started")

    def __init__(self, job: Job, flusher: _Flusher) -> None:
        self.job = job
        self.flusher = flusher
        #: Last completed stage (the job's checkpoint).
        self.stage = job.stage
        #: JSON of the last persisted state in this attempt (None: unchanged in the DB).
        self.saved_state: str | None = None
        self.started = time.monotonic()
        #: A terminal outcome was submitted: the job is no longer ours to cancel or release.
        self.finished = False

    async def checkpoint(self, state: dict[str, Any], stage: str | None) -> None:
        text = state_json(state, stage)
        future = self.flusher.submit(
            Outcome(self.job.id, self.job.attempt, JobStatus.RUNNING, self.stage, text),
            wait=True,
        )
        assert future is not None
        if not await future:
            raise LeaseLostError(f"job {self.job.id}: lease lost during stage {stage!r}")
        self.saved_state = text


class BaseWorker(abc.ABC):
    """Subclass it and return your stages from ``stages()``; ``await run()`` does the rest.

    Args:
        config: the validated configuration.
        pool: an open psycopg ``AsyncConnectionPool`` to share (left open on exit);
            by default the worker opens its own, sized ``concurrency`` + a few.
    """

    #: Breakers that must be closed for this worker to claim jobs (claims pause while open).
    required_breakers: tuple[str, ...] = ()

    def __init__(self, config: WorkerConfig, *, pool: AsyncConnectionPool | None = None) -> None:
        self.config = config
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.metrics = ProcessingMetrics(queue=config.queue.name)
        self.logger = StructuredLogger(
            "worker_core.worker", worker_id=self.worker_id, queue=config.queue.name
        )
        # Per-job lines are skipped before any formatting work when their level is off.
        self._enabled = logging.getLogger("worker_core.worker").isEnabledFor
        self.queue: Queue | None = None
        self.health_checks: dict[str, Callable[[], Awaitable[Any]]] = {}
        self.is_running = False
        self.is_draining = False
        self.started_at: float | None = None
        self.last_loop_at: float | None = None
        self.last_claim_at: float | None = None
        self.listener_connected = False
        #: The /healthz, /readyz, /metrics server while running (``health.http_port``).
        self.health_server: Any = None
        #: How many times the LISTEN connection was (re)established.
        self.listener_connects = 0
        self._given_pool = pool
        self._pool: AsyncConnectionPool | None = None
        self._registry: Any = None
        self._limiters: RateLimiterRegistry | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        #: Claimed (under lease) but not started: the prefetch buffer.
        self._buffer: collections.deque[Job] = collections.deque()
        self._runs: dict[int, _JobRun] = {}
        self._cancel_reason: dict[int, str] = {}
        self._flusher: _Flusher | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._force = False
        self._may_not_vacuum = False  # the role does not own the jobs table
        self._maybe_work = True
        self._stages: list[Stage] = []
        self._rng = random.Random()
        self._run_task: asyncio.Task[Any] | None = None
        self._hooks_started = False
        # console wiring (the next line)
        self._console = WorkerConsole(config, self.worker_id, in_flight=self._tasks.__len__)

    # -- what users implement ------------------------------------------------------
    @abc.abstractmethod
    def stages(self) -> Sequence[Stage]:
        """The stages every job of this worker runs through, in order."""

    def classify(self, exc: BaseException) -> ErrorKind:
        """Transient, permanent or retryable; see ``worker_core.retry.classify``."""
        return classify(exc)

    def retry_delay(self, job: Job, exc: BaseException) -> float:
        """Seconds before the job runs again: ``retry_after`` if given, else full-jitter backoff."""
        if isinstance(exc, RetryableError) and exc.retry_after is not None:
            return float(exc.retry_after)
        retry = self.config.retry
        return backoff(
            max(job.attempt, 1),
            base_delay=retry.base_delay,
            max_delay=retry.max_delay,
            rng=self._rng,
        )

    async def on_startup(self) -> None:
        """Called once per ``run()`` before the first claim (open clients here)."""

    async def on_shutdown(self) -> None:
        """Called once per ``run()`` after the last job (close clients here)."""

    async def on_job_done(self, job: Job) -> None:
        """Called after a job succeeded and its completion was written."""

    async def on_dead_letter(self, job: Job, exc: BaseException) -> None:
        """Called after a job went to the dead-letter queue."""

    # -- services for stages ---------------------------------------------------------
    @property
    def pool(self) -> AsyncConnectionPool:
        if self._pool is None:
            raise RuntimeError("the worker is not running: its connection pool is closed")
        return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled autocommit connection for the duration of the block."""
        async with self.pool.connection() as conn:
            yield conn

    def breaker(self, name: str) -> CircuitBreaker:
        """The worker's circuit breaker ``name`` (created on first use from config)."""
        registry = self._breaker_registry()
        breaker: CircuitBreaker = registry.get(name)
        return breaker

    def rate_limiter(self, name: str) -> TokenBucket | None:
        """The token bucket of service ``name`` from ``config.rate_limits`` (None: no limit).

        One bucket per name, shared by all of this worker's jobs; waiting on it holds
        no database connection.
        """
        if self._limiters is None:
            from .ratelimit import RateLimiterRegistry

            self._limiters = RateLimiterRegistry.from_config(self.config)
        return self._limiters.get(name)

    @property
    def breakers(self) -> Mapping[str, CircuitBreaker]:
        registry = self._registry
        return dict(registry.items()) if registry is not None else {}

    def _breaker_registry(self) -> Any:
        if self._registry is None:
            from .breaker import BreakerRegistry

            self._registry = BreakerRegistry(self.config.circuit_breaker)
            self._registry.add_listener(self.metrics.breaker_changed)
        return self._registry

    def add_health_check(self, name: str, check: Callable[[], Awaitable[Any]]) -> None:
        """Add a check to ``health()``; it may return ComponentHealth, a bool or None."""
        self.health_checks[name] = check

    async def health(self) -> HealthReport:
        """The aggregated health of the database, the worker, its breakers and storage."""
        from .health import check_worker

        return await check_worker(self)

    @property
    def in_flight(self) -> int:
        """Jobs running now (not counting the prefetch buffer)."""
        return len(self._tasks)

    # -- running -----------------------------------------------------------------
    async def run(self, until_empty: bool = False, *, install_signal_handlers: bool = True) -> None:
        """Claim and process jobs until ``stop()``, SIGTERM/SIGINT, or (``until_empty``)
        until no job is ready and none is in flight."""
        if self.is_running:
            raise RuntimeError(f"worker {self.worker_id} is already running")
        self._stages = validate_stages(self.stages())
        self._reset_run_state()
        self.is_running = True
        self._run_task = asyncio.current_task()
        self.started_at = time.monotonic()
        background: list[asyncio.Task[Any]] = []
        restore_signals: Callable[[], None] = _nothing
        server: Any = None
        try:
            # First, so a SIGTERM while the worker is still connecting is a graceful
            # stop (exit 0) rather than the default death by signal.
            if install_signal_handlers:
                restore_signals = self._install_signal_handlers()
            self._pool = self._given_pool or await open_pool(
                self.config,
                max_size=max(
                    self.config.database.pool_max_size,
                    self.config.queue.concurrency + CORE_CONNECTIONS,
                ),
            )
            self.queue = Queue(self.config, pool=self._pool)
            await self._check_schema()
            # Attached from the first run on, so a breaker a stage creates later
            # already shares the fleet's state.
            await self._breaker_registry().attach(self.queue)
            await self.on_startup()
            self._hooks_started = True
            self._flusher = _Flusher(self, self.queue)
            background = [
                asyncio.create_task(self._flusher.run(), name="worker_core.flusher"),
                asyncio.create_task(self._heartbeat_loop(), name="worker_core.heartbeat"),
                asyncio.create_task(self._listen_loop(), name="worker_core.listener"),
                asyncio.create_task(self._maintenance_loop(), name="worker_core.maintenance"),
                asyncio.create_task(self._vacuum_loop(), name="worker_core.vacuum"),
            ]
            background += self._console.start(self.queue)  # console wiring
            if self.config.health.http_port is not None:
                from .health import HealthServer

                server = HealthServer(
                    self, host=self.config.health.http_host, port=self.config.health.http_port
                )
                await server.start()
                self.health_server = server
            await self._rescue()
            self.logger.info(
                "worker started",
                concurrency=self.config.queue.concurrency,
                stages=[s.name for s in self._stages],
            )
            await self._dispatch(until_empty)
        finally:
            try:
                await self._drain()
            finally:
                for task in background:
                    task.cancel()
                for task in background:
                    with contextlib.suppress(BaseException):
                        await task
                if server is not None:
                    with contextlib.suppress(Exception):
                        await server.stop()
                    self.health_server = None
                await self._finish_run(restore_signals)

    async def _finish_run(self, restore_signals: Callable[[], None]) -> None:
        try:
            if self._hooks_started:
                self._hooks_started = False
                try:
                    await self.on_shutdown()
                except Exception:
                    self.logger.exception("on_shutdown hook failed")
            await self._console.stop()  # console wiring
            if self._registry is not None:
                with contextlib.suppress(Exception):
                    await self._registry.detach()
        finally:
            restore_signals()
            if self._flusher is not None:
                self._flusher.fail_waiters()
            if self._pool is not None and self._given_pool is None:
                await self._pool.close()
            self._pool = None
            self.is_running = False
            self.is_draining = False
            self.listener_connected = False
            self._stopped.set()
            self.logger.info("worker stopped", **_brief(self.metrics.summary()))

    async def stop(self) -> None:
        """Stop claiming, let in-flight jobs finish within ``shutdown_timeout``, release
        the rest (back to queued, attempt refunded), and wait until ``run()`` returns."""
        self._request_stop()
        current = asyncio.current_task()
        if current is self._run_task or current in self._tasks.values():
            return  # called from inside the worker: it stops once this job returns
        if self.is_running:
            await self._stopped.wait()

    def _request_stop(self) -> None:
        if not self._stopping.is_set():
            self.logger.info("stopping: no new claims", in_flight=len(self._tasks))
        self._stopping.set()
        self._wake.set()

    def _reset_run_state(self) -> None:
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._force = False
        self._maybe_work = True
        self._tasks.clear()
        self._buffer.clear()
        self._runs.clear()
        self._cancel_reason.clear()

    async def _check_schema(self) -> None:
        assert self.queue is not None
        version = await self.queue.schema_version()
        latest = migrations()[-1].version
        if version == 0:
            raise RuntimeError(
                f"schema {self.queue.schema!r} is not installed: run `worker-core migrate` "
                "or `await Queue(config).migrate()` first"
            )
        if version < latest:
            raise RuntimeError(
                f"schema {self.queue.schema!r} is at version {version}, this worker_core needs "
                f"{latest}: run `worker-core migrate`"
            )

    def _install_signal_handlers(self) -> Callable[[], None]:
        loop = asyncio.get_running_loop()
        installed: list[tuple[int, Any]] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous = signal.getsignal(sig)
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or no signal support on this platform
            installed.append((sig, previous))

        def restore() -> None:
            for sig, previous in installed:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
                    if previous is not None and previous is not signal.SIG_DFL:
                        signal.signal(sig, previous)

        return restore

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._stopping.is_set():
            self.logger.warning("second signal: releasing in-flight jobs now", signal=name)
            self._force = True
            self._wake.set()
            return
        self.logger.info("signal received: shutting down gracefully", signal=name)
        self._request_stop()

    # -- the dispatcher ------------------------------------------------------------
    async def _dispatch(self, until_empty: bool) -> None:
        assert self.queue is not None
        assert self._flusher is not None
        queue_cfg = self.config.queue
        capacity = queue_cfg.concurrency + queue_cfg.prefetch
        # With a prefetch buffer, small refills wait until a quarter of it is free,
        # so one finishing job does not cost one claim round trip.
        min_refill = max(1, queue_cfg.prefetch // 4) if queue_cfg.prefetch else 1
        error_delay = 0.05
        while not self._stopping.is_set():
            self.last_loop_at = time.monotonic()
            self._start_buffered()
            room = capacity - len(self._tasks) - len(self._buffer)
            starving = not self._buffer and len(self._tasks) < queue_cfg.concurrency
            wanted = room > 0 and (starving or room >= min_refill)
            drained = False
            if wanted and (self._maybe_work or not (self._tasks or self._buffer)):
                pause = self._paused_for()
                if pause is not None:
                    await self._wait(min(pause, queue_cfg.poll_interval))
                    continue
                self._wake.clear()
                claim_started = time.monotonic()
                try:
                    jobs = await self.queue.claim(
                        self.worker_id, room, lease_seconds=queue_cfg.lease_seconds
                    )
                except Exception as exc:
                    self.logger.warning(
                        "claim failed; retrying",
                        error=redact_text(str(exc)),
                        error_type=type(exc).__name__,
                        retry_in=round(error_delay, 3),
                    )
                    await self._wait(error_delay)
                    error_delay = min(error_delay * 2, queue_cfg.poll_interval)
                    continue
                error_delay = 0.05
                self.last_claim_at = time.monotonic()
                self.metrics.claim_completed(self.last_claim_at - claim_started, len(jobs))
                drained = len(jobs) < room
                self._maybe_work = not drained
                if jobs:
                    self.metrics.job_claimed(len(jobs))
                    if self._stopping.is_set():
                        self._release_unstarted(jobs)
                        break
                    self._buffer.extend(jobs)
                    self._start_buffered()
                if until_empty and drained and not self._tasks and not self._buffer:
                    if self._flusher.busy:
                        await self._flusher.flush()  # a retry written now may be ready at once
                        self._maybe_work = True
                        continue
                    soon = await self._next_ready_in()
                    if soon is None:
                        break
                    await self._wait(soon)
                    self._maybe_work = True
                    continue
                if not drained:
                    continue  # full: wait for a slot to free
            await self._wait(queue_cfg.poll_interval)

    def _start_buffered(self) -> None:
        free = self.config.queue.concurrency - len(self._tasks)
        while free > 0 and self._buffer:
            self._start(self._buffer.popleft())
            free -= 1

    async def _next_ready_in(self) -> float | None:
        """Seconds until the next queued job is ready, if within one poll interval."""
        assert self.queue is not None
        run_at = await self.queue.next_run_at()
        if run_at is None:
            return None
        wait = (run_at - datetime.now(UTC)).total_seconds()
        return max(wait, 0.001) if wait <= self.config.queue.poll_interval else None

    async def _wait(self, timeout: float) -> None:
        """Sleep until woken (NOTIFY, a freed slot, stop) or ``timeout`` passes."""
        if self._wake.is_set():
            self._wake.clear()
            return
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            self._maybe_work = True  # the fallback poll: also finds jobs whose run_at came
        self._wake.clear()

    def _paused_for(self) -> float | None:
        if not self.required_breakers:
            return None
        waits = []
        for name in self.required_breakers:
            breaker = self.breaker(name)
            if str(getattr(breaker, "state", "closed")) == "open":
                waits.append(max(float(getattr(breaker, "retry_after", 0.0)), 0.01))
        if not waits:
            return None
        self.logger.debug("claiming paused: required breaker open", wait=min(waits))
        return min(waits)

    def _start(self, job: Job) -> None:
        assert self._flusher is not None
        run = _JobRun(job, self._flusher)
        self._runs[job.id] = run
        task = asyncio.create_task(self._execute(job, run), name=f"worker_core.job.{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(functools.partial(self._task_done, job.id))

    def _task_done(self, job_id: int, _task: asyncio.Task[None] | None = None) -> None:
        self._tasks.pop(job_id, None)
        self._runs.pop(job_id, None)
        self._cancel_reason.pop(job_id, None)
        self._wake.set()

    def _release_unstarted(self, jobs: list[Job]) -> None:
        assert self._flusher is not None
        for job in jobs:
            self._flusher.submit(
                Outcome(job.id, job.attempt, JobStatus.QUEUED, job.stage, refund=1, delay=0.0)
            )
        self.metrics.job_released(len(jobs))

    # -- one job -------------------------------------------------------------------
    async def _execute(self, job: Job, run: _JobRun) -> None:
        assert self._flusher is not None
        self.metrics.job_started()
        state = dict(job.state)
        ctx = StageContext(job, state, self, run, self.metrics)
        failing_stage: str | None = None
        try:
            with job_context(
                correlation_id=job.correlation_id,
                job_id=job.id,
                queue=job.queue,
                attempt=job.attempt,
                worker_id=self.worker_id,
            ):
                if self._enabled(logging.DEBUG):
                    self.logger.debug(
                        "job claimed", job_id=job.id, attempt=job.attempt, stage=job.stage
                    )
                try:
                    for stage in self._remaining_stages(job):
                        failing_stage = ctx.stage = stage.name
                        with job_context(stage=stage.name):
                            await self._run_stage(stage, ctx)
                        run.stage = stage.name
                        text = state_json(state, stage.name)
                        if stage is not self._stages[-1]:
                            # Fire-and-forget: a crash before the flush re-runs one
                            # idempotent stage; the final outcome supersedes it anyway.
                            self._flusher.submit(
                                Outcome(job.id, job.attempt, JobStatus.RUNNING, run.stage, text)
                            )
                        run.saved_state = text
                    await self._succeed(job, run, state)
                except asyncio.CancelledError:
                    if job.id in self._cancel_reason:
                        self._cancelled(job, run)
                    else:  # raised inside a stage, not a cancellation of ours
                        await self._fail(
                            job, run, TransientError("stage was cancelled"), failing_stage
                        )
                except Exception as exc:
                    await self._fail(job, run, exc, failing_stage)
        finally:
            self.metrics.job_ended()

    def _remaining_stages(self, job: Job) -> list[Stage]:
        if job.stage is None:
            return self._stages
        names = [s.name for s in self._stages]
        if job.stage in names:
            return self._stages[names.index(job.stage) + 1 :]
        self.logger.warning(
            "checkpointed stage is not one of this worker's stages; starting over",
            job_id=job.id,
            checkpoint=job.stage,
        )
        return self._stages

    async def _run_stage(self, stage: Stage, ctx: StageContext) -> None:
        started = time.monotonic()
        timeout = getattr(stage, "timeout", None)
        try:
            if timeout:
                try:
                    async with asyncio.timeout(timeout):
                        await stage.run(ctx)
                except TimeoutError as exc:
                    raise TimeoutError(
                        f"stage {stage.name!r} exceeded its timeout of {timeout}s"
                    ) from exc
            else:
                await stage.run(ctx)
        except BaseException:
            elapsed = time.monotonic() - started
            self.metrics.stage_failed(stage.name, elapsed)
            self._console.stage(ctx.job, stage.name, False, elapsed)  # console wiring
            raise
        elapsed = time.monotonic() - started
        self.metrics.stage_completed(stage.name, elapsed)
        self._console.stage(ctx.job, stage.name, True, elapsed)  # console wiring
        if self._enabled(logging.DEBUG):
            self.logger.debug("stage done", seconds=round(elapsed, 6))

    async def _succeed(self, job: Job, run: _JobRun, state: dict[str, Any]) -> None:
        assert self._flusher is not None
        hook = type(self).on_job_done is not BaseWorker.on_job_done
        run.finished = True
        future = self._flusher.submit(
            Outcome(job.id, job.attempt, JobStatus.SUCCEEDED, run.stage, run.saved_state),
            wait=hook,
        )
        elapsed = time.monotonic() - run.started
        self.metrics.job_succeeded(elapsed)
        self._console.job(job, "succeeded", elapsed)  # console wiring
        if self._enabled(logging.INFO):
            self.logger.info("job succeeded", seconds=round(elapsed, 6))
        if future is not None and await future:
            done = replace(job, status=JobStatus.SUCCEEDED, stage=run.stage, state=state)
            await self._call_hook("on_job_done", self.on_job_done(done))

    def _cancelled(self, job: Job, run: _JobRun) -> None:
        assert self._flusher is not None
        reason = self._cancel_reason.get(job.id, "release")
        if run.finished:
            return
        if reason == "lease_lost":
            self.metrics.lease_lost()
            self.logger.warning("lease lost: job abandoned (another worker owns it now)")
            return
        self._flusher.submit(
            Outcome(
                job.id,
                job.attempt,
                JobStatus.QUEUED,
                run.stage,
                run.saved_state,
                refund=1,
                delay=0.0,
            )
        )
        self.metrics.job_released()
        self.logger.info("job released at shutdown; attempt refunded", stage=run.stage)

    async def _fail(self, job: Job, run: _JobRun, exc: Exception, stage: str | None) -> None:
        assert self._flusher is not None
        elapsed = time.monotonic() - run.started
        if isinstance(exc, LeaseLostError):
            self.metrics.lease_lost()
            self.logger.warning("lease lost: job abandoned", error=str(exc))
            return
        try:
            kind = ErrorKind(self.classify(exc))
        except Exception:
            self.logger.exception("classify() failed; treating the error as transient")
            kind = ErrorKind.TRANSIENT
        retry = self.config.retry
        plan = plan_failure(
            kind,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            deferrals=job.deferrals,
            max_deferrals=retry.max_deferrals,
        )
        record = self._error_record(job, exc, stage, plan.kind, plan.note)
        error = dump_json(record, "error record")
        error_type = type(exc).__name__
        run.finished = True
        if plan.transition in (Transition.DEFER, Transition.RETRY):
            deferred = plan.transition is Transition.DEFER
            delay = self._delay(job, exc)
            self._flusher.submit(
                Outcome(
                    job.id,
                    job.attempt,
                    JobStatus.QUEUED,
                    run.stage,
                    run.saved_state,
                    refund=int(deferred),  # a deferral gives the attempt back
                    deferred=int(deferred),
                    delay=delay,
                    error=error,
                )
            )
            self.metrics.attempt_failed(error_type, elapsed, "deferred" if deferred else "retried")
            self._console.job(job, "deferred" if deferred else "retried", elapsed)  # console wiring
            if deferred:
                log, event = self.logger.info, "job deferred"
                count = {"deferrals": job.deferrals + 1}
            else:
                log, event = self.logger.warning, "job failed; will retry"
                count = {"attempts_left": job.max_attempts - job.attempt}
            log(event, stage=stage, retry_in=round(delay, 3), error_type=error_type,
                error=record["message"], **count)  # fmt: skip
            return
        reason = plan.note or "permanent error"
        hook = type(self).on_dead_letter is not BaseWorker.on_dead_letter
        future = self._flusher.submit(
            Outcome(job.id, job.attempt, JobStatus.DEAD, run.stage, run.saved_state, error=error),
            wait=hook,
        )
        self.metrics.attempt_failed(error_type, elapsed, "dead")
        self._console.job(job, "dead", elapsed)  # console wiring
        self.logger.error(
            "job dead-lettered",
            stage=stage,
            reason=reason,
            error_type=error_type,
            error=record["message"],
        )
        if future is not None and await future:
            dead = replace(
                job,
                status=JobStatus.DEAD,
                stage=run.stage,
                last_error=record,
                errors=[*job.errors, record],
            )
            await self._call_hook("on_dead_letter", self.on_dead_letter(dead, exc))

    def _delay(self, job: Job, exc: BaseException) -> float:
        try:
            delay = float(self.retry_delay(job, exc))
        except Exception:
            self.logger.exception("retry_delay() failed; using backoff")
            delay = backoff(
                job.attempt,
                base_delay=self.config.retry.base_delay,
                max_delay=self.config.retry.max_delay,
                rng=self._rng,
            )
        return min(max(delay, 0.0), 365 * 24 * 3600.0)

    def _error_record(
        self, job: Job, exc: BaseException, stage: str | None, kind: ErrorKind, note: str | None
    ) -> dict[str, Any]:
        secrets_ = self.config.secrets()
        message = redact_text(str(exc) or type(exc).__name__, secrets_)[:_MAX_MESSAGE]
        record: dict[str, Any] = {
            "type": type(exc).__name__,
            "message": message,
            "stage": stage,
            "attempt": job.attempt,
            "kind": kind.value,
            "at": datetime.now(UTC).isoformat(),
            "worker": self.worker_id,
        }
        if note:
            record["note"] = note
        if isinstance(exc, WorkerCoreError) and exc.detail:
            try:
                detail = redact_value(exc.detail, secrets=secrets_)
                dump_json(detail, "detail")
                record["detail"] = detail
            except PayloadError:
                record["detail"] = redact_text(repr(exc.detail), secrets_)[:_MAX_MESSAGE]
        if isinstance(exc, RetryableError) and exc.retry_after is not None:
            record["retry_after"] = exc.retry_after
        tb = "".join(traceback.format_exception(exc, limit=-8))
        record["traceback"] = redact_text(tb, secrets_)[-_MAX_TRACEBACK:]
        return record

    async def _call_hook(self, name: str, call: Awaitable[None]) -> None:
        try:
            await call
        except Exception:
            self.logger.exception(f"{name} hook failed")

    # -- shutdown ------------------------------------------------------------------
    async def _drain(self) -> None:
        self.is_draining = True
        if self._buffer:
            self._release_unstarted(list(self._buffer))
            self._buffer.clear()
        tasks = list(self._tasks.values())
        if tasks and not self._force:
            self.logger.info(
                "waiting for in-flight jobs",
                in_flight=len(tasks),
                timeout=self.config.queue.shutdown_timeout,
            )
            deadline = time.monotonic() + self.config.queue.shutdown_timeout
            while self._tasks and not self._force:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await asyncio.wait(
                    list(self._tasks.values()),
                    timeout=min(left, 0.5),
                    return_when=asyncio.FIRST_COMPLETED,
                )
        for job_id, task in list(self._tasks.items()):
            self._cancel_reason.setdefault(job_id, "release")
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=5.0)
        if self._flusher is not None:
            try:
                async with asyncio.timeout(max(10.0, self.config.queue.shutdown_timeout)):
                    await self._flusher.flush()
            except TimeoutError:
                self.logger.error(
                    "could not write every outcome before exit; "
                    "their leases will expire and the jobs will be rescued",
                    pending=len(self._flusher),
                )

    # -- background tasks ---------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        queue_cfg = self.config.queue
        rescue_every = max(min(queue_cfg.lease_seconds / 2, 30.0), queue_cfg.heartbeat_seconds)
        last_rescue = time.monotonic()
        while True:
            await asyncio.sleep(queue_cfg.heartbeat_seconds)
            try:
                await self._heartbeat()
                if time.monotonic() - last_rescue >= rescue_every:
                    last_rescue = time.monotonic()
                    await self._rescue()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.logger.warning(
                    "heartbeat failed", error=redact_text(str(exc)), error_type=type(exc).__name__
                )

    async def _heartbeat(self) -> None:
        assert self.queue is not None
        assert self._flusher is not None
        running = list(self._tasks)
        buffered = [job.id for job in self._buffer]
        ids = sorted(set(running) | set(buffered) | set(self._flusher.pending_ids))
        if not ids:
            return
        held = await self.queue.heartbeat(
            self.worker_id, ids, lease_seconds=self.config.queue.lease_seconds
        )
        for job_id in running:
            task = self._tasks.get(job_id)
            run = self._runs.get(job_id)
            if (
                job_id not in held
                and task is not None
                and not task.done()
                and not (run is not None and run.finished)
            ):
                # Someone rescued this job: stop working on it (its writes would be fenced).
                self._cancel_reason[job_id] = "lease_lost"
                task.cancel()
        lost = {job_id for job_id in buffered if job_id not in held}
        if lost:  # claimed ahead but never started: simply forget them
            self._buffer = collections.deque(j for j in self._buffer if j.id not in lost)
            self.metrics.lease_lost(len(lost))

    def _breaker_tripped_elsewhere(self) -> None:
        """Another worker opened a fleet breaker: read the fleet state now, not on the
        next call, so this worker stops calling the dead service at once."""
        store = getattr(self._registry, "store", None)
        if store is not None and store.active:
            store.spawn(store.refresh(max_age=0.0))

    async def _maintenance_loop(self) -> None:
        settings = self.config.maintenance
        if settings.retention_seconds is not None or settings.dead_retention_seconds is not None:
            await self._every(settings.interval, self.prune, "pruning finished jobs failed")

    async def _vacuum_loop(self) -> None:
        settings = self.config.maintenance
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
                self.logger.warning(
                    failed, error=redact_text(str(exc)), error_type=type(exc).__name__
                )
            await asyncio.sleep(interval)

    async def vacuum(self) -> int | None:
        """VACUUM the jobs table if it holds ``maintenance.vacuum_dead_rows`` dead rows
        or more and no other worker is vacuuming it; returns the dead rows or None."""
        assert self.queue is not None
        threshold = self.config.maintenance.vacuum_dead_rows
        if threshold is None or self._may_not_vacuum:
            return None
        started = time.monotonic()
        try:
            dead_rows = await self.queue.vacuum(min_dead_rows=threshold)
        except PermissionError as exc:
            self._may_not_vacuum = True
            self.logger.warning(
                "not vacuuming the jobs table: leaving it to autovacuum", reason=str(exc)
            )
            return None
        if dead_rows is not None:
            self.metrics.table_vacuumed()
            self.logger.info(
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
        assert self.queue is not None
        settings = self.config.maintenance
        total = 0
        batches = 0
        while max_batches is None or batches < max_batches:
            batches += 1
            deleted = await self.queue.prune(
                retention_seconds=settings.retention_seconds,
                dead_retention_seconds=settings.dead_retention_seconds,
                limit=settings.batch_size,
            )
            total += deleted
            if deleted < settings.batch_size:
                break
        if total:
            self.metrics.jobs_pruned(total)
            self.logger.info("pruned finished jobs", deleted=total)
        return total

    async def _rescue(self) -> None:
        assert self.queue is not None
        rescued = await self.queue.rescue()
        if rescued:
            dead = sum(1 for _, _, status in rescued if status is JobStatus.DEAD)
            self.metrics.jobs_rescued(len(rescued))
            self.logger.warning(
                "rescued jobs with expired leases",
                rescued=len(rescued),
                dead=dead,
                job_ids=[job_id for job_id, _, _ in rescued[:20]],
            )
            self._maybe_work = True
            self._wake.set()

    async def _listen_loop(self) -> None:
        from psycopg import AsyncConnection, sql

        assert self.queue is not None
        delay = 0.1
        name = self.config.queue.name
        breaker_channel = self.queue.breaker_channel
        while True:
            conn = None
            try:
                conn = await AsyncConnection.connect(
                    self.config.dsn(),
                    autocommit=True,
                    connect_timeout=max(1, int(self.config.database.connect_timeout)),
                    application_name=f"{self.config.database.application_name}.listen",
                )
                for channel in (self.queue.channel, self.queue.breaker_channel):
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                self.listener_connected = True
                self.listener_connects += 1
                delay = 0.1
                self._maybe_work = True  # catch up on what was sent while disconnected
                self._wake.set()
                while True:
                    async for notice in conn.notifies(timeout=30.0):
                        if notice.channel == breaker_channel:
                            self._breaker_tripped_elsewhere()
                        elif notice.payload == name:
                            self._maybe_work = True
                            self._wake.set()
                    await conn.execute("SELECT 1")  # a dead connection shows here
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.listener_connected:
                    self.logger.warning(
                        "LISTEN connection lost; reconnecting",
                        error=redact_text(str(exc)),
                        error_type=type(exc).__name__,
                    )
                self.listener_connected = False
                await asyncio.sleep(delay * (0.5 + self._rng.random()))
                delay = min(delay * 2, 2.0)
            finally:
                self.listener_connected = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()


def _nothing() -> None:
    return None


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("processed", "failed", "retried", "deferred", "dead_lettered", "released")
    return {k: summary[k] for k in keys}
