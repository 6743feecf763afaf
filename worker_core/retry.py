"""Error classification and backoff; pure functions that take their rng.

``classify`` maps an exception to what the worker does with the job, and
``backoff`` is full-jitter exponential backoff (AWS "Exponential Backoff and
Jitter"): ``uniform(0, min(max_delay, base_delay * 2 ** (attempt - 1)))``.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
from dataclasses import dataclass
from typing import Protocol

from .errors import (
    LeaseLostError,
    PermanentError,
    RetryableError,
    TransientError,
    WorkerCoreError,
)
from .jobs import Transition

__all__ = ["ErrorKind", "FailurePlan", "Random", "backoff", "classify", "plan_failure"]


class ErrorKind(enum.StrEnum):
    """What a failure means for the job."""

    #: Retry with backoff; consumes an attempt.
    TRANSIENT = "transient"
    #: Dead-letter now.
    PERMANENT = "permanent"
    #: Retry after ``retry_after`` without consuming an attempt.
    RETRYABLE = "retryable"

    def __str__(self) -> str:
        return self.value


class Random(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


_PERMANENT_TYPES: tuple[type[BaseException], ...] = (
    UnicodeDecodeError,
    UnicodeEncodeError,
    json.JSONDecodeError,
)


def _is_pydantic_validation_error(exc: BaseException) -> bool:
    # pydantic is a dependency, but importing it here would slow `import worker_core`.
    cls = type(exc)
    return cls.__name__ == "ValidationError" and cls.__module__.startswith("pydantic")


def classify(exc: BaseException) -> ErrorKind:
    """The default classification of DESIGN.md section 5.

    worker_core's own errors say what they are; timeouts and connection errors are
    transient; validation, decoding and JSON errors are permanent; anything else is
    transient, bounded by ``retry.max_attempts``.
    """
    if isinstance(exc, RetryableError):
        return ErrorKind.RETRYABLE
    if isinstance(exc, PermanentError):
        return ErrorKind.PERMANENT
    if isinstance(exc, TransientError | LeaseLostError):
        return ErrorKind.TRANSIENT
    if isinstance(exc, WorkerCoreError):
        return ErrorKind.TRANSIENT
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | ConnectionError | OSError):
        return ErrorKind.TRANSIENT
    if isinstance(exc, _PERMANENT_TYPES) or _is_pydantic_validation_error(exc):
        return ErrorKind.PERMANENT
    return ErrorKind.TRANSIENT


def backoff(
    attempt: int,
    *,
    base_delay: float = 1.0,
    max_delay: float = 300.0,
    rng: Random | None = None,
) -> float:
    """Full-jitter exponential backoff for the ``attempt``-th attempt (1-based), in seconds."""
    if attempt < 1:
        attempt = 1
    # Cap the exponent before computing it: 2 ** 10_000 is a very large int.
    exponent = min(attempt - 1, 1024)
    ceiling = max_delay if exponent >= 1023 else min(max_delay, base_delay * 2.0**exponent)
    return (rng or random).uniform(0.0, ceiling)


@dataclass(frozen=True, slots=True)
class FailurePlan:
    """What happens to a job whose attempt raised."""

    #: RETRY (queued, attempt used), DEFER (queued, attempt refunded) or BURY (dead).
    transition: Transition
    #: The kind after limits were applied (a deferral past its limit is transient).
    kind: ErrorKind
    note: str | None = None


def plan_failure(
    kind: ErrorKind, *, attempt: int, max_attempts: int, deferrals: int, max_deferrals: int
) -> FailurePlan:
    """The state-machine decision for a failed attempt (DESIGN.md section 5).

    Retryable errors defer without using the attempt until ``max_deferrals`` is
    reached; from then on they count like transient errors. Transient errors retry
    while attempts are left. Everything else goes to the dead-letter queue.
    """
    note = None
    if kind is ErrorKind.RETRYABLE:
        if deferrals < max_deferrals:
            return FailurePlan(Transition.DEFER, kind)
        kind, note = ErrorKind.TRANSIENT, f"deferral limit {max_deferrals} reached"
    if kind is ErrorKind.TRANSIENT:
        if attempt < max_attempts:
            return FailurePlan(Transition.RETRY, kind, note)
        return FailurePlan(Transition.BURY, kind, note or f"attempts exhausted ({max_attempts})")
    return FailurePlan(Transition.BURY, ErrorKind.PERMANENT, note)
