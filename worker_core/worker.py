"""BaseWorker: the class users subclass, a façade over the private run components.

A subclass gives ``stages()`` and may override the policies and hooks
(``classify``, ``retry_delay``, ``on_startup``, ``on_shutdown``, ``on_job_done``,
``on_dead_letter``, ``on_cancelled``); ``run()``, ``stop()``, ``health()``,
``snapshot()``, ``metrics``, ``worker_id`` and ``config`` are what callers use,
and ``connection()``, ``breaker()``, ``rate_limiter()`` and ``add_health_check()``
serve the subclass itself. Everything else lives in private components that each
``run()`` composes afresh (``_runtime``: pool, signals; ``_dispatch``: claims;
``_executor``: stages to outcome; ``_completer``: batched fenced writes;
``_maintenance``: heartbeat, rescue, prune, vacuum; ``_notifier``: LISTEN;
``_watchdog``: event-loop stalls). None of them imports this module: the façade
hands each run its stage list, hooks and services as plain callables.
"""

from __future__ import annotations

import abc
import asyncio
import os
import random
import secrets
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from ._executor import Hooks
from ._runtime import RunParts, Runtime
from .config import WorkerConfig
from .errors import RetryableError
from .jobs import Job
from .logs import StructuredLogger
from .metrics import ProcessingMetrics
from .retry import ErrorKind, backoff, classify
from .snapshot import HealthCheck, WorkerSnapshot
from .stages import Stage

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

    from .breaker import BreakerRegistry, CircuitBreaker
    from .health import HealthReport
    from .ratelimit import RateLimiterRegistry, TokenBucket

__all__ = ["BaseWorker"]


class BaseWorker(abc.ABC):
    """Subclass it and return your stages from ``stages()``; ``await run()`` does the rest.

    Args:
        config: the validated configuration.
        pool: an open psycopg ``AsyncConnectionPool`` to share (left open on exit);
            by default each ``run()`` opens its own, sized ``concurrency`` + a few.
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
        self._given_pool = pool
        self._runtime: Runtime | None = None
        self._registry: BreakerRegistry | None = None
        self._limiters: RateLimiterRegistry | None = None
        self._health_checks: dict[str, HealthCheck] = {}
        self._rng = random.Random()

    # -- what users implement ------------------------------------------------------
    @abc.abstractmethod
    def stages(self) -> Sequence[Stage]:
        """The stages every job of this worker runs through, in order.

        Called once per ``run()``, after ``on_startup()`` (so it may use the clients
        opened there).
        """

    def classify(self, exc: BaseException) -> ErrorKind:
        """Transient, permanent or retryable; see ``worker_core.retry.classify``."""
        return classify(exc)

    def retry_delay(self, job: Job, exc: BaseException) -> float:
        """Seconds before the job runs again: ``retry_after`` if given, else full-jitter backoff.

        A value that is not a finite number of seconds (NaN, inf) is logged and
        replaced by the backoff; negative values mean now; at most one year.
        """
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
        """Called once per ``run()`` before ``stages()`` and the first claim (open clients here)."""

    async def on_shutdown(self) -> None:
        """Called once per ``run()`` after the last job (close clients here)."""

    async def on_job_done(self, job: Job) -> None:
        """Called after a job succeeded and its completion was written."""

    async def on_dead_letter(self, job: Job, exc: BaseException) -> None:
        """Called after a job went to the dead-letter queue."""

    async def on_cancelled(self, job: Job) -> None:
        """Called after a running job was cancelled and its cancellation was written."""

    # -- services for the subclass and its stages --------------------------------------
    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled autocommit connection for the duration of the block (while running)."""
        if self._runtime is None or not self._runtime.running:
            raise RuntimeError("the worker is not running: its connection pool is closed")
        async with self._runtime.connection() as conn:
            yield conn

    def breaker(self, name: str) -> CircuitBreaker:
        """The worker's circuit breaker ``name`` (created on first use from config)."""
        return self._breakers().get(name)

    def rate_limiter(self, name: str) -> TokenBucket | None:
        """The token bucket of service ``name`` from ``config.rate_limits`` (None: no limit).

        One bucket per name, shared by all of this worker's jobs; waiting on it holds
        no database connection.
        """
        if self._limiters is None:
            from .ratelimit import RateLimiterRegistry

            self._limiters = RateLimiterRegistry.from_config(self.config)
        return self._limiters.get(name)

    def add_health_check(self, name: str, check: HealthCheck) -> None:
        """Add a check to ``health()``; it may return ComponentHealth, a bool or None."""
        self._health_checks[name] = check

    # -- observing -------------------------------------------------------------------
    def snapshot(self) -> WorkerSnapshot:
        """This worker now: running, draining, in flight, last claim, LISTEN, breakers."""
        breakers = dict(self._registry.items()) if self._registry is not None else {}
        checks = dict(self._health_checks)
        if self._runtime is None:
            return WorkerSnapshot(
                self.worker_id,
                concurrency=self.config.queue.concurrency,
                breakers=breakers,
                health_checks=checks,
            )
        return self._runtime.snapshot(breakers, checks)

    async def health(self) -> HealthReport:
        """The aggregated health of the database, the worker, its breakers and checks."""
        from .health import check_worker

        return await check_worker(self)

    # -- running ---------------------------------------------------------------------
    async def run(self, until_empty: bool = False, *, install_signal_handlers: bool = True) -> None:
        """Claim and process jobs until ``stop()``, SIGTERM/SIGINT, or (``until_empty``)
        until no job is ready and none is in flight."""
        if self._runtime is not None and self._runtime.running:
            raise RuntimeError(f"worker {self.worker_id} is already running")
        self._runtime = runtime = Runtime(self._parts())
        await runtime.run(until_empty, install_signal_handlers=install_signal_handlers)

    async def stop(self) -> None:
        """Stop claiming, let in-flight jobs finish within ``shutdown_timeout``, release
        the rest (back to queued, attempt refunded), and wait until ``run()`` returns."""
        runtime = self._runtime
        if runtime is None or not runtime.running:
            return
        runtime.request_stop()
        if runtime.owns(asyncio.current_task()):
            return  # called from inside the worker: it stops once this job returns
        await runtime.wait_stopped()

    def _parts(self) -> RunParts:
        cls = type(self)
        hooks = Hooks(
            classify=self.classify,
            retry_delay=self.retry_delay,
            # Not overridden: nothing to call, so no need to wait for the write.
            on_job_done=self.on_job_done if cls.on_job_done is not BaseWorker.on_job_done else None,
            on_dead_letter=(
                self.on_dead_letter if cls.on_dead_letter is not BaseWorker.on_dead_letter else None
            ),
            on_cancelled=(
                self.on_cancelled if cls.on_cancelled is not BaseWorker.on_cancelled else None
            ),
        )
        return RunParts(
            worker=self,
            view=self,
            config=self.config,
            worker_id=self.worker_id,
            metrics=self.metrics,
            logger=self.logger,
            hooks=hooks,
            stages=self.stages,
            on_startup=self.on_startup,
            on_shutdown=self.on_shutdown,
            breakers=self._breakers(),
            rate_limiter=self.rate_limiter,
            required_breakers=tuple(self.required_breakers),
            pool=self._given_pool,
            rng=self._rng,
        )

    def _breakers(self) -> BreakerRegistry:
        if self._registry is None:
            from .breaker import BreakerRegistry

            self._registry = BreakerRegistry(self.config.circuit_breaker)
            self._registry.add_listener(self.metrics.breaker_changed)
        return self._registry
