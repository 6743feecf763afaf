"""ProcessingMetrics: in-process counters of a worker, bounded in memory.

Counters and running sums only (no per-job lists), so memory does not grow
however long the worker runs; error types are capped. ``summary()`` is the dict
of DESIGN.md section 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ProcessingMetrics"]

_MAX_ERROR_TYPES = 200
_MAX_STAGES = 200


@dataclass(slots=True)
class _Timing:
    count: int = 0
    seconds: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds

    @property
    def avg(self) -> float:
        return self.seconds / self.count if self.count else 0.0


@dataclass(slots=True)
class _StageStats:
    completed: int = 0
    failed: int = 0
    timing: _Timing | None = None

    def __post_init__(self) -> None:
        self.timing = _Timing()


class ProcessingMetrics:
    """What one worker did: jobs succeeded, attempts failed, retries, deferrals, dead letters.

    Args:
        queue: the queue label for exported metrics.
    """

    def __init__(self, queue: str = "default") -> None:
        self.queue = queue
        self.processed = 0
        self.failed = 0
        self.retried = 0
        self.deferred = 0
        self.dead_lettered = 0
        self.released = 0
        self.leases_lost = 0
        self.rescued = 0
        self.claimed = 0
        self.in_flight = 0
        self._attempts = _Timing()
        self._stages: dict[str, _StageStats] = {}
        self._errors: dict[str, int] = {}

    # -- recording (called by the worker) -------------------------------------------
    def job_claimed(self, n: int = 1) -> None:
        self.claimed += n

    def job_started(self) -> None:
        self.in_flight += 1

    def job_ended(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def job_succeeded(self, seconds: float) -> None:
        self.processed += 1
        self._attempts.add(seconds)

    def attempt_failed(self, error_type: str, seconds: float, outcome: str) -> None:
        """An attempt raised; ``outcome`` is retried, deferred or dead."""
        self.failed += 1
        self._attempts.add(seconds)
        if outcome == "retried":
            self.retried += 1
        elif outcome == "deferred":
            self.deferred += 1
        elif outcome == "dead":
            self.dead_lettered += 1
        key = error_type if error_type in self._errors or len(self._errors) < _MAX_ERROR_TYPES else "other"
        self._errors[key] = self._errors.get(key, 0) + 1

    def job_released(self, n: int = 1) -> None:
        self.released += n

    def lease_lost(self, n: int = 1) -> None:
        self.leases_lost += n

    def jobs_rescued(self, n: int) -> None:
        self.rescued += n

    def stage_completed(self, stage: str, seconds: float) -> None:
        stats = self._stage(stage)
        stats.completed += 1
        assert stats.timing is not None
        stats.timing.add(seconds)

    def stage_failed(self, stage: str, seconds: float) -> None:
        stats = self._stage(stage)
        stats.failed += 1
        assert stats.timing is not None
        stats.timing.add(seconds)

    def _stage(self, stage: str) -> _StageStats:
        stats = self._stages.get(stage)
        if stats is None:
            if len(self._stages) >= _MAX_STAGES:
                stage = "other"
                stats = self._stages.get(stage)
            if stats is None:
                stats = self._stages[stage] = _StageStats()
        return stats

    # -- reading ------------------------------------------------------------------
    @property
    def total(self) -> int:
        return self.processed + self.failed

    def summary(self) -> dict[str, Any]:
        """Counts and averages: processed, failed, total, retried, deferred, dead_lettered,
        avg_seconds, stages, errors (plus released, leases_lost, rescued, in_flight)."""
        return {
            "processed": self.processed,
            "failed": self.failed,
            "total": self.total,
            "retried": self.retried,
            "deferred": self.deferred,
            "dead_lettered": self.dead_lettered,
            "avg_seconds": round(self._attempts.avg, 6),
            "stages": {
                name: {
                    "completed": s.completed,
                    "failed": s.failed,
                    "avg_seconds": round(s.timing.avg if s.timing else 0.0, 6),
                }
                for name, s in sorted(self._stages.items())
            },
            "errors": dict(sorted(self._errors.items())),
            "released": self.released,
            "leases_lost": self.leases_lost,
            "rescued": self.rescued,
            "in_flight": self.in_flight,
        }

    def __repr__(self) -> str:
        return f"ProcessingMetrics(processed={self.processed}, failed={self.failed})"
