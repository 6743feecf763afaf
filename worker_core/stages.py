"""The Stage protocol and the StageContext a stage runs with.

A stage is a small object with a ``name`` and ``async run(ctx)``; a worker is a
list of them. After each stage the job's ``stage`` and ``state`` are
checkpointed, and a retried or rescued job resumes at the first stage not yet
completed, so stages must be idempotent (the write helpers make that cheap).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from .errors import PayloadError
from .jobs import Job, clean_text, dump_json
from .logs import StructuredLogger
from .metrics import ProcessingMetrics

if TYPE_CHECKING:
    from psycopg import AsyncConnection

    from .breaker import CircuitBreaker
    from .ratelimit import TokenBucket

__all__ = ["RunServices", "Stage", "StageContext", "state_json", "validate_stages"]

T = TypeVar("T")

#: Longest stage name: it is stored in every checkpoint and error record.
MAX_STAGE_NAME = 200


@runtime_checkable
class Stage(Protocol):
    """One step of a job. Optional attribute ``timeout: float | None`` (seconds);
    exceeding it is a transient error."""

    name: str

    async def run(self, ctx: StageContext) -> None: ...


class RunServices(Protocol):
    """What a running worker lends every stage (implemented per ``run()``)."""

    @property
    def logger(self) -> StructuredLogger: ...

    def connection(self) -> AbstractAsyncContextManager[AsyncConnection[Any]]: ...

    def breaker(self, name: str) -> CircuitBreaker: ...

    def rate_limiter(self, name: str) -> TokenBucket | None: ...

    async def offload(self, fn: Callable[..., T], /, *args: Any, process: bool = False) -> T: ...


class Checkpointer(Protocol):
    """Persists one run's state mid-stage (fenced by the run's lease token)."""

    async def checkpoint(self, state: dict[str, Any], stage: str | None) -> None: ...


class StageContext:
    """What a stage sees: the job, its shared ``state`` and the worker's services."""

    __slots__ = ("_logger", "_run", "_services", "job", "metrics", "stage", "state", "worker")

    def __init__(
        self,
        job: Job,
        state: dict[str, Any],
        *,
        worker: Any,
        services: RunServices,
        run: Checkpointer,
        metrics: ProcessingMetrics,
    ) -> None:
        self.job = job
        #: JSON-serialisable dict shared by the job's stages; checkpointed after each stage.
        self.state = state
        #: The worker object (your clients, configuration).
        self.worker = worker
        self.metrics = metrics
        #: The name of the stage now running.
        self.stage: str | None = None
        self._services = services
        self._run = run
        self._logger: StructuredLogger | None = None

    @property
    def logger(self) -> StructuredLogger:
        """A logger bound to the job's correlation_id, job_id, queue, stage, attempt, worker_id."""
        if self._logger is None or self._logger.context.get("stage") != self.stage:
            self._logger = self._services.logger.bind(
                correlation_id=self.job.correlation_id,
                job_id=self.job.id,
                queue=self.job.queue,
                attempt=self.job.attempt,
                stage=self.stage,
            )
        return self._logger

    def connection(self) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
        """Lend a pooled autocommit connection; give it back before awaiting S3 or HTTP."""
        return self._services.connection()

    async def checkpoint(self) -> None:
        """Persist ``state`` now (a long stage records its cursor).

        Raises:
            PayloadError: ``state`` cannot be stored (not JSON, a lone surrogate, over
                ``queue.max_state_bytes``); names the key.
            LeaseLostError: the job was rescued or claimed again; stop working on it.
        """
        await self._run.checkpoint(self.state, self.stage)

    def breaker(self, name: str) -> CircuitBreaker:
        """The worker's circuit breaker called ``name`` (one per name, shared by all jobs)."""
        return self._services.breaker(name)

    def rate_limiter(self, name: str) -> TokenBucket | None:
        """The worker's token bucket for service ``name`` (``None`` when unlimited)."""
        return self._services.rate_limiter(name)

    async def offload(self, fn: Callable[..., T], /, *args: Any, process: bool = False) -> T:
        """Run blocking or CPU-bound ``fn(*args)`` off the event loop and return its result.

        In a thread by default; with ``process=True`` in the worker's process pool
        (``fn`` and its arguments must then be picklable: a module-level function).
        Heartbeats and other jobs go on meanwhile. A cancelled run stops waiting,
        but the thread or process finishes the call.
        """
        return await self._services.offload(fn, *args, process=process)

    def __repr__(self) -> str:
        return f"StageContext(job_id={self.job.id}, stage={self.stage!r})"


def validate_stages(stages: Sequence[Any]) -> list[Stage]:
    """Check a stage list at start-up; raise ``TypeError``/``ValueError`` naming the problem."""
    if isinstance(stages, str | bytes) or not isinstance(stages, Sequence):
        raise TypeError(f"stages() must return a list of stages, not {type(stages).__name__}")
    if not stages:
        raise ValueError("stages() returned no stages; a worker needs at least one")
    seen: set[str] = set()
    checked: list[Stage] = []
    for i, stage in enumerate(stages):
        name = getattr(stage, "name", None)
        if not isinstance(name, str) or not name.strip():
            raise TypeError(
                f"stage #{i} ({type(stage).__name__}) needs a non-empty string attribute 'name'"
            )
        if clean_text(name) != name or len(name) > MAX_STAGE_NAME:
            raise ValueError(
                f"stage #{i} ({type(stage).__name__}): its name must be at most "
                f"{MAX_STAGE_NAME} characters without NUL or lone surrogates"
            )
        run = getattr(stage, "run", None)
        if run is None or not callable(run):
            raise TypeError(f"stage {name!r} ({type(stage).__name__}) has no run(ctx) method")
        if not inspect.iscoroutinefunction(run):
            raise TypeError(f"stage {name!r}: run(ctx) must be an async def")
        if name in seen:
            raise ValueError(f"two stages are named {name!r}; stage names must be unique")
        timeout = getattr(stage, "timeout", None)
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
        ):
            raise ValueError(f"stage {name!r}: timeout must be a positive number or None")
        seen.add(name)
        checked.append(stage)
    return checked


def state_json(state: Any, stage: str | None, *, max_bytes: int | None = None) -> str:
    """``state`` as JSON text, or a ``PayloadError`` naming the stage and key (not JSON,
    a NUL or lone surrogate, over ``max_bytes``)."""
    if not isinstance(state, dict):
        raise PayloadError(
            f"state after stage {stage!r} must be a dict, not {type(state).__name__}"
        )
    if not state:
        return "{}"
    return dump_json(state, f"state after stage {stage!r}", max_bytes=max_bytes)
