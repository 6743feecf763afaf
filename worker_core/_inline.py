"""Running stages in process, without a database (``worker_core.testing.run_stages``).

The stages get a real ``StageContext``: a structured logger bound to the job, a
``ProcessingMetrics``, real circuit breakers and rate limiters from the config,
``offload`` on threads or processes, and ``checkpoint`` checking the state as the
worker would but storing nothing. What a stage cannot get without a database is a
connection: ``ctx.connection()`` lends the one given, or raises a clear error.

The payload and the starting state go through JSON as they would through the jobs
table, so a stage sees exactly the types it will see in production.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import multiprocessing
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from .config import WorkerConfig
from .jobs import Job, JobStatus, dump_json
from .logs import StructuredLogger, job_context
from .metrics import ProcessingMetrics
from .stages import Stage, StageContext, state_json, validate_stages

if TYPE_CHECKING:
    from psycopg import AsyncConnection

    from .breaker import BreakerRegistry, CircuitBreaker
    from .ratelimit import RateLimiter, RateLimiterRegistry

__all__ = ["InlineRun", "arun_stages", "run_stages"]

T = TypeVar("T")


class InlineRun:
    """The services and checkpoint recorder of one inline run (``RunServices`` and
    ``Checkpointer``). ``checkpoints`` holds ``(stage, state)`` of every checkpoint."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        connection: AsyncConnection[Any] | None,
        metrics: ProcessingMetrics,
    ) -> None:
        self.config = config
        self._connection = connection
        self.metrics = metrics
        self._logger = StructuredLogger("worker_core.inline")
        self._breakers: BreakerRegistry | None = None
        self._limiters: RateLimiterRegistry | None = None
        self._processes: ProcessPoolExecutor | None = None
        self.checkpoints: list[tuple[str | None, dict[str, Any]]] = []

    @property
    def logger(self) -> StructuredLogger:
        return self._logger

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        if self._connection is None:
            raise RuntimeError(
                "this stage called ctx.connection(), but run_stages() was given no "
                "database connection: pass connection=<a psycopg AsyncConnection>"
            )
        yield self._connection

    def breaker(self, name: str) -> CircuitBreaker:
        if self._breakers is None:
            from .breaker import BreakerRegistry

            self._breakers = BreakerRegistry(self.config.circuit_breaker)
            self._breakers.add_listener(self.metrics.breaker_changed)
        return self._breakers.get(name)

    def rate_limiter(self, name: str) -> RateLimiter | None:
        if self._limiters is None:
            from .ratelimit import RateLimiterRegistry

            self._limiters = RateLimiterRegistry.from_config(self.config)
        return self._limiters.get(name)

    async def offload(self, fn: Callable[..., T], /, *args: Any, process: bool = False) -> T:
        loop = asyncio.get_running_loop()
        if process:
            if self._processes is None:
                methods = multiprocessing.get_all_start_methods()
                method = "forkserver" if "forkserver" in methods else "spawn"
                self._processes = ProcessPoolExecutor(
                    self.config.queue.offload_processes or 2,
                    mp_context=multiprocessing.get_context(method),
                )
            return await loop.run_in_executor(self._processes, functools.partial(fn, *args))
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await loop.run_in_executor(None, call)

    async def checkpoint(self, state: dict[str, Any], stage: str | None) -> None:
        text = state_json(state, stage, max_bytes=self.config.queue.max_state_bytes)
        self.checkpoints.append((stage, json.loads(text)))

    def close(self) -> None:
        if self._processes is not None:
            self._processes.shutdown(wait=True, cancel_futures=True)
            self._processes = None


async def arun_stages(
    stages: Sequence[Stage],
    payload: Mapping[str, Any],
    *,
    state: Mapping[str, Any] | None = None,
    attempt: int = 1,
    connection: AsyncConnection[Any] | None = None,
    worker: Any = None,
    config: WorkerConfig | None = None,
) -> dict[str, Any]:
    """``run_stages`` for code that already runs an event loop (``await`` it)."""
    checked = validate_stages(stages)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be an int >= 1, got {attempt!r}")
    if not isinstance(payload, Mapping):
        raise TypeError(f"payload must be a dict (a JSON object), not {type(payload).__name__}")
    config = config or WorkerConfig()
    # Through JSON, as through the jobs table: a stage sees what it will see for real.
    body = json.loads(dump_json(payload, "payload", max_bytes=config.queue.max_payload_bytes))
    start = json.loads(state_json(dict(state or {}), None, max_bytes=config.queue.max_state_bytes))
    job = Job(
        id=0,
        queue=config.queue.primary,
        payload=body,
        status=JobStatus.RUNNING,
        state=start,
        attempt=attempt,
        max_attempts=max(attempt, config.retry.max_attempts),
        correlation_id=f"inline-{uuid.uuid4()}",
    )
    metrics = ProcessingMetrics()
    run = InlineRun(config, connection=connection, metrics=metrics)
    ctx = StageContext(job, start, worker=worker, services=run, run=run, metrics=metrics)
    try:
        with job_context(correlation_id=job.correlation_id, job_id=job.id, queue=job.queue,
                         attempt=attempt):  # fmt: skip
            for stage in checked:
                ctx.stage = stage.name
                with job_context(stage=stage.name):
                    await _run_stage(stage, ctx, metrics)
                state_json(ctx.state, stage.name, max_bytes=config.queue.max_state_bytes)
    finally:
        run.close()
    return ctx.state


async def _run_stage(stage: Stage, ctx: StageContext, metrics: ProcessingMetrics) -> None:
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
        metrics.stage_failed(stage.name, time.monotonic() - started)
        raise
    metrics.stage_completed(stage.name, time.monotonic() - started)


def run_stages(
    stages: Sequence[Stage],
    payload: Mapping[str, Any],
    *,
    state: Mapping[str, Any] | None = None,
    attempt: int = 1,
    connection: AsyncConnection[Any] | None = None,
    worker: Any = None,
    config: WorkerConfig | None = None,
) -> dict[str, Any]:
    """Run ``stages`` on ``payload`` in this process, without a database, and return
    the final state; a stage's exception propagates unchanged.

    ``state`` and ``attempt`` set up a resumed or retried job. ``connection`` is what
    ``ctx.connection()`` lends (without it, a stage asking for one gets a clear
    ``RuntimeError``); ``worker`` is ``ctx.worker``; ``config`` configures breakers,
    rate limits and size limits. From inside an event loop use ``arun_stages``.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "run_stages() runs its own event loop; inside async code use "
            "`await worker_core.testing.arun_stages(...)`"
        )
    return asyncio.run(
        arun_stages(
            stages,
            payload,
            state=state,
            attempt=attempt,
            connection=connection,
            worker=worker,
            config=config,
        )
    )
