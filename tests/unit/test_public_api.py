"""The public API of DESIGN.md section 1, and the cost of importing it."""

from __future__ import annotations

import subprocess
import sys

import worker_core

CONTRACT = {
    "BaseWorker",
    "Stage",
    "StageContext",
    "Job",
    "JobStatus",
    "Queue",
    "WorkerConfig",
    "StructuredLogger",
    "configure_logging",
    "ProcessingMetrics",
    "WorkerCoreError",
    "TransientError",
    "PermanentError",
    "RetryableError",
    "CircuitOpenError",
    "CircuitBreaker",
    "CircuitState",
    "HealthReport",
    "HealthStatus",
    "chunk_id",
    "Chunk",
    "ChunkWriter",
    "WriteResult",
    "Schedule",
    "SyncQueue",
}


def test_all_holds_the_contract_sorted() -> None:
    assert set(worker_core.__all__) >= CONTRACT
    assert worker_core.__all__ == sorted(worker_core.__all__)


def test_every_name_resolves() -> None:
    for name in worker_core.__all__:
        assert getattr(worker_core, name) is not None, name


def test_error_tree() -> None:
    from worker_core import (
        CircuitOpenError,
        PermanentError,
        RetryableError,
        TransientError,
        WorkerCoreError,
    )

    assert issubclass(TransientError, WorkerCoreError)
    assert issubclass(PermanentError, WorkerCoreError)
    assert issubclass(RetryableError, WorkerCoreError)
    assert issubclass(CircuitOpenError, RetryableError)
    err = RetryableError("slow down", retry_after=2.5, status=429)
    assert (err.retry_after, err.detail, str(err)) == (2.5, {"status": 429}, "slow down")
    assert CircuitOpenError(breaker="embed", retry_after=3).breaker == "embed"


def test_import_is_light() -> None:
    # Heavy dependencies load on first use, not on `import worker_core`.
    code = (
        "import sys, worker_core; "
        "heavy = [m for m in ('psycopg', 'pydantic', 'aiohttp', 'aiobotocore', 'structlog') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
