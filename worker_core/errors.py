"""The exception tree of worker_core.

Raise these from a stage to tell the worker what to do with the job::

    WorkerCoreError
    ├── TransientError        retry with full-jitter exponential backoff; counts an attempt
    ├── PermanentError        dead-letter now (bad input, invalid config for this job)
    │   └── PayloadError      a payload or stage state that cannot be stored as JSON
    ├── RetryableError        retry after .retry_after seconds (rate limits); no attempt consumed
    │   └── CircuitOpenError  .breaker, .retry_after = time until the circuit may half-open
    └── LeaseLostError        the job was rescued from this worker; its result is discarded

Every class takes ``(message="", **detail)``; ``detail`` is copied into the job's
error record, so keep it small and JSON-serialisable.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "CircuitOpenError",
    "LeaseLostError",
    "PayloadError",
    "PermanentError",
    "RetryableError",
    "TransientError",
    "WorkerCoreError",
]


class WorkerCoreError(Exception):
    """Root of every error worker_core raises or understands."""

    def __init__(self, message: str = "", **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.detail: dict[str, Any] = detail

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class TransientError(WorkerCoreError):
    """A failure that may go away: retried with backoff, consuming an attempt."""


class PermanentError(WorkerCoreError):
    """A failure that will not go away by retrying: the job goes to the dead-letter queue."""


class PayloadError(PermanentError, ValueError):
    """A payload or stage state that cannot be stored as JSON; names the offending key."""


class RetryableError(WorkerCoreError):
    """Try again later without consuming an attempt (rate limits, a service asking to wait).

    Args:
        retry_after: seconds to wait; ``None`` means use the worker's backoff. A
            negative value is read as 0; one that is not a finite number (NaN, inf,
            text) as ``None``, so a garbled header cannot park a job forever.
    """

    def __init__(self, message: str = "", *, retry_after: float | None = None, **detail: Any):
        super().__init__(message, **detail)
        self.retry_after = _seconds(retry_after)


class CircuitOpenError(RetryableError):
    """A call was refused because the named circuit breaker is open."""

    def __init__(
        self,
        message: str = "",
        *,
        breaker: str = "",
        retry_after: float | None = None,
        **detail: Any,
    ) -> None:
        super().__init__(
            message or f"circuit {breaker!r} is open", retry_after=retry_after, **detail
        )
        self.breaker = breaker


class LeaseLostError(WorkerCoreError):
    """The job's lease moved to another worker (it was rescued); this run is void."""


def _seconds(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None
