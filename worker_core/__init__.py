"""worker_core: the shared asyncio core of PostgreSQL-backed ingestion workers.

The public API is the names in ``__all__``. They are imported on first use
(PEP 562), so ``import worker_core`` stays cheap for command-line tools.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .breaker import CircuitBreaker, CircuitState
    from .config import WorkerConfig
    from .errors import (
        CircuitOpenError,
        PermanentError,
        RetryableError,
        TransientError,
        WorkerCoreError,
    )
    from .health import ComponentHealth, HealthReport, HealthStatus
    from .jobs import Job, JobStatus
    from .logs import StructuredLogger, configure_logging
    from .metrics import ProcessingMetrics
    from .queue import Queue
    from .retry import ErrorKind
    from .schedules import Schedule
    from .stages import Stage, StageContext
    from .syncqueue import SyncQueue
    from .worker import BaseWorker
    from .writes import Chunk, ChunkWriter, WriteResult, chunk_id

__version__ = "0.1.0.dev0"

_EXPORTS: dict[str, str] = {
    "BaseWorker": "worker",
    "Chunk": "writes",
    "ChunkWriter": "writes",
    "CircuitBreaker": "breaker",
    "CircuitOpenError": "errors",
    "CircuitState": "breaker",
    "ComponentHealth": "health",
    "ErrorKind": "retry",
    "HealthReport": "health",
    "HealthStatus": "health",
    "Job": "jobs",
    "JobStatus": "jobs",
    "PermanentError": "errors",
    "ProcessingMetrics": "metrics",
    "Queue": "queue",
    "RetryableError": "errors",
    "Schedule": "schedules",
    "Stage": "stages",
    "StageContext": "stages",
    "StructuredLogger": "logs",
    "SyncQueue": "syncqueue",
    "TransientError": "errors",
    "WorkerConfig": "config",
    "WorkerCoreError": "errors",
    "WriteResult": "writes",
    "chunk_id": "writes",
    "configure_logging": "logs",
}

__all__ = [
    "BaseWorker",
    "Chunk",
    "ChunkWriter",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "ComponentHealth",
    "ErrorKind",
    "HealthReport",
    "HealthStatus",
    "Job",
    "JobStatus",
    "PermanentError",
    "ProcessingMetrics",
    "Queue",
    "RetryableError",
    "Schedule",
    "Stage",
    "StageContext",
    "StructuredLogger",
    "SyncQueue",
    "TransientError",
    "WorkerConfig",
    "WorkerCoreError",
    "WriteResult",
    "chunk_id",
    "configure_logging",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'worker_core' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
