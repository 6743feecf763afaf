"""The Stage protocol and the StageContext a stage runs with.

A stage is a small object with a ``name`` and ``async run(ctx)``; a worker is a
list of them. After each stage the job's ``stage`` and ``state`` are
checkpointed, and a retried or rescued job resumes at the first stage not yet
completed, so stages must be idempotent (the write helpers make that cheap).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import PayloadError
from .jobs import Job, dump_json
from .logs import StructuredLogger
from .metrics import ProcessingMetrics

if TYPE_CHECKING:
    from psycopg import AsyncConnection

    from .breaker import CircuitBreaker
    from .ratelimit import RateLimiter
    from .worker import BaseWorker, _JobRun

__all__ = ["Stage", "StageContext", "validate_stages"]


@runtime_checkable
class Stage(Protocol):
    """One step of a job. Optional attribute ``timeout: float | None`` (seconds);
    exceeding it is a transient error."""

    name: str

    async def run(self, ctx: StageContext) -> None: ...


class StageContext:
    """What a stage sees: the job, its shared ``state`` and the worker's services."""

    __slots__ = ("_logger", "_run", "job", "metrics", "stage", "state", "worker")

    def __init__(
        self,
        job: Job,
        state: dict[str, Any],
        worker: BaseWorker,
        run: _JobRun,
        metrics: ProcessingMetrics,
    ) -> None:
        self.job = job
        #: JSON-serialisable dict shared by the job's stages; checkpointed after each stage.
        self.state = state
        self.worker = worker
        self.metrics = metrics
        #: The name of the stage now running.
        self.stage: str | None = None
        self._run = run
        self._logger: StructuredLogger | None = None

    @property
    def logger(self) -> StructuredLogger:
        """A logger bound to the job's correlation_id, job_id, queue, stage, attempt, worker_id."""
        if self._logger is None or self._logger.context.get("stage") != self.stage:
            self._logger = self.worker.logger.bind(
                correlation_id=self.job.correlation_id,
                job_id=self.job.id,
                queue=self.job.queue,
                attempt=self.job.attempt,
                stage=self.stage,
            )
        return self._logger

    def connection(self) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
        """Lend a pooled autocommit connection; give it back before awaiting S3 or HTTP."""
        return self.worker.connection()

    async def checkpoint(self) -> None:
        """Persist ``state`` now (a long stage records its cursor).

        Raises:
            PayloadError: ``state`` is not JSON-serialisable (names the key).
            LeaseLostError: the job was rescued by another worker; stop working on it.
        """
        await self._run.checkpoint(self.state, self.stage)

    def breaker(self, name: str) -> CircuitBreaker:
        """The worker's circuit breaker called ``name`` (one per name, shared by all jobs)."""
        return self.worker.breaker(name)

    def rate_limiter(self, name: str) -> RateLimiter | None:
        """The worker's token bucket for service ``name`` (``None`` when unlimited)."""
        return self.worker.rate_limiter(name)

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


def state_json(state: Any, stage: str | None) -> str:
    """``state`` as JSON text, or a ``PayloadError`` naming the stage and key."""
    if not isinstance(state, dict):
        raise PayloadError(
            f"state after stage {stage!r} must be a dict, not {type(state).__name__}"
        )
    if not state:
        return "{}"
    return dump_json(state, f"state after stage {stage!r}")
