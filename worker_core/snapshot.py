"""WorkerSnapshot: what health checks, metrics and the HTTP server read of a worker.

A worker hands out a frozen, typed snapshot of its run (``worker.snapshot()``)
instead of letting observers reach into its attributes; anything with
``config``, ``worker_id``, ``metrics`` and ``snapshot()`` (a ``WorkerView``) can
be observed, which is also how tests build a worker in any state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .breaker import CircuitBreaker
    from .config import WorkerConfig
    from .metrics import ProcessingMetrics
    from .queue import Queue

__all__ = ["HealthCheck", "WorkerSnapshot", "WorkerView"]

#: A check added with ``add_health_check``: may return ComponentHealth, a bool, a
#: mapping or None (see ``worker_core.health.run_check``).
HealthCheck = Callable[[], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """One worker's run at one moment. Times are ``time.monotonic()`` values."""

    worker_id: str
    #: Between the start of ``run()`` and its return.
    running: bool = False
    #: Stopping: no new claims, in-flight jobs finishing.
    draining: bool = False
    started_at: float | None = None
    #: The claim loop's last turn (a stuck loop stops updating it).
    last_loop_at: float | None = None
    last_claim_at: float | None = None
    #: Jobs running now, and claimed ahead of free slots (the prefetch buffer).
    in_flight: int = 0
    buffered: int = 0
    concurrency: int = 0
    #: The LISTEN connection is up; how many times it was (re)established this run.
    listener_connected: bool = False
    listener_connects: int = 0
    #: LISTEN is off on purpose (the database is reached through a pooler): poll only.
    polling_only: bool = False
    #: The run's Queue (its pool serves the database checks), None when not running.
    queue: Queue | None = None
    breakers: Mapping[str, CircuitBreaker] = field(default_factory=dict)
    health_checks: Mapping[str, HealthCheck] = field(default_factory=dict)


class WorkerView(Protocol):
    """What observers need of a worker (``BaseWorker`` is one)."""

    @property
    def config(self) -> WorkerConfig: ...

    @property
    def worker_id(self) -> str: ...

    @property
    def metrics(self) -> ProcessingMetrics: ...

    def snapshot(self) -> WorkerSnapshot: ...
