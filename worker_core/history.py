"""Persistent per-minute metrics: the rollups a worker records and flushes.

``HistoryRecorder`` adds each attempt's outcome and each stage's result to an
in-memory row of its minute (per queue, kind and stage) at no I/O cost; ``flush``
writes every pending row with one statement (``Queue.record_history``), where the
counts of all workers of the fleet add up. A failed flush keeps the rows for the
next one, up to ``max_minutes`` minutes of them (older ones are dropped and
counted). ``percentile`` reads the coarse duration histogram back. Pure except for
``flush``; the clock is injected.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .jobs import Job
    from .queue import Queue

__all__ = ["BOUNDS", "OUTCOMES", "HistoryRecorder", "job_kind", "merge_buckets", "percentile"]

#: Upper bounds (s) of the duration buckets; one more bucket holds the rest (+Inf).
BOUNDS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: What an attempt can end as.
OUTCOMES = ("succeeded", "retried", "deferred", "dead")
_MAX_NAMES = 200
_MAX_NAME = 120


def job_kind(job: Job) -> str:
    """The job's kind ("default" until the job model gives jobs a kind)."""
    kind = getattr(job, "kind", None)
    return kind if isinstance(kind, str) and kind else "default"


@dataclass(slots=True)
class _Row:
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    deferred: int = 0
    dead_lettered: int = 0
    seconds_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))

    def observe(self, seconds: float) -> None:
        seconds = seconds if math.isfinite(seconds) and seconds > 0 else 0.0
        self.seconds_sum += seconds
        self.buckets[bisect_left(BOUNDS, seconds)] += 1

    def add(self, other: _Row) -> None:
        self.succeeded += other.succeeded
        self.failed += other.failed
        self.retried += other.retried
        self.deferred += other.deferred
        self.dead_lettered += other.dead_lettered
        self.seconds_sum += other.seconds_sum
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]


Key = tuple[int, str, str, str]  # minute (epoch s), queue, kind, stage ("" for the job row)


class HistoryRecorder:
    """Per-minute counts of one worker, waiting for the next flush.

    Args:
        clock: wall-clock seconds (``time.time``); minutes are UTC epoch minutes.
        max_minutes: how many distinct minutes to keep while flushes fail.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, max_minutes: int = 60) -> None:
        self._clock = clock
        self._max_minutes = max_minutes
        self._rows: dict[Key, _Row] = {}
        self._names: set[str] = set()
        #: The rows of the current minute by the names as given: one clock read and
        #: one dict lookup per call on the hot path (every job and every stage).
        #: Emptied whenever ``_rows`` gives rows away or drops them.
        self._minute = -1
        self._minute_end = -math.inf
        self._current: dict[tuple[str, str, str], _Row] = {}
        #: Rows dropped because flushes kept failing (or names over the cap).
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._rows)

    def job(self, queue: str, kind: str, outcome: str, seconds: float) -> None:
        """One attempt ended as ``outcome`` (succeeded, retried, deferred or dead)."""
        row = self._current.get((queue, kind, ""))
        if row is None or not self._minute <= self._clock() < self._minute_end:
            if outcome not in OUTCOMES:
                raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
            row = self._row(queue, kind, "")
        if outcome == "succeeded":
            row.succeeded += 1
        elif outcome in OUTCOMES:
            row.failed += 1
            if outcome == "retried":
                row.retried += 1
            elif outcome == "deferred":
                row.deferred += 1
            else:
                row.dead_lettered += 1
        else:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
        # _Row.observe, inline: this runs for every job.
        if 0.0 < seconds < math.inf:
            row.seconds_sum += seconds
            row.buckets[bisect_left(BOUNDS, seconds)] += 1
        else:
            row.buckets[0] += 1

    def stage(self, queue: str, kind: str, stage: str, ok: bool, seconds: float) -> None:
        """One run of ``stage`` completed (``ok``) or raised."""
        stage = stage or "?"
        row = self._current.get((queue, kind, stage))
        if row is None or not self._minute <= self._clock() < self._minute_end:
            row = self._row(queue, kind, stage)
        if ok:
            row.succeeded += 1
        else:
            row.failed += 1
        if 0.0 < seconds < math.inf:
            row.seconds_sum += seconds
            row.buckets[bisect_left(BOUNDS, seconds)] += 1
        else:
            row.buckets[0] += 1

    def record(self, job: Job, outcome: str, seconds: float) -> None:
        """``job(...)`` for a job object."""
        self.job(job.queue, job_kind(job), outcome, seconds)

    def record_stage(self, job: Job, stage: str, ok: bool, seconds: float) -> None:
        """``stage(...)`` for a job object."""
        self.stage(job.queue, job_kind(job), stage, ok, seconds)

    def _row(self, queue: str, kind: str, stage: str) -> _Row:
        now = self._clock()
        minute = int(now // 60 * 60)
        if minute != self._minute:
            self._minute = minute
            self._minute_end = minute + 60.0
            self._current = {}
        given = (queue, kind, stage)
        row = self._current.get(given)
        if row is None:
            key = (minute, self._name(queue), self._name(kind), self._name(stage) if stage else "")
            row = self._rows.get(key)
            if row is None:
                row = self._rows[key] = _Row()
            if len(self._current) < _MAX_NAMES:
                self._current[given] = row
        return row

    def _name(self, name: str) -> str:
        # Label sets stay bounded however many names a buggy caller invents.
        name = str(name)[:_MAX_NAME] or "?"
        if name in self._names:
            return name
        if len(self._names) >= _MAX_NAMES:
            return "other"
        self._names.add(name)
        return name

    def take(self) -> list[tuple[Any, ...]]:
        """Every pending row as ``Queue.record_history`` takes it; the recorder is emptied."""
        rows, self._rows = self._rows, {}
        self._current = {}
        return [
            (
                *key,
                r.succeeded,
                r.failed,
                r.retried,
                r.deferred,
                r.dead_lettered,
                r.seconds_sum,
                r.buckets,
            )
            for key, r in rows.items()
        ]

    def restore(self, rows: Sequence[Sequence[Any]]) -> None:
        """Put rows back after a failed flush (merged with what arrived meanwhile)."""
        for minute, queue, kind, stage, *counts in rows:
            succeeded, failed, retried, deferred, dead, seconds_sum, buckets = counts
            row = _Row(succeeded, failed, retried, deferred, dead, seconds_sum, list(buckets))
            mine = self._rows.setdefault((minute, queue, kind, stage), _Row())
            mine.add(row)
        minutes = sorted({key[0] for key in self._rows})
        if len(minutes) > self._max_minutes:
            cutoff = minutes[-self._max_minutes]
            old = [key for key in self._rows if key[0] < cutoff]
            for key in old:
                del self._rows[key]
            self._current = {}
            self.dropped += len(old)

    async def flush(self, queue: Queue) -> int:
        """Write every pending row in one statement; returns the rows written.

        On failure the rows are kept for the next flush and the error propagates.
        """
        rows = self.take()
        if not rows:
            return 0
        try:
            await queue.record_history(rows)
        except BaseException:
            self.restore(rows)
            raise
        return len(rows)


def percentile(buckets: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0 < q < 1) of a ``BOUNDS`` histogram, interpolated inside
    its bucket; None when empty. The last bucket reports its lower bound."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            low = BOUNDS[i - 1] if i > 0 else 0.0
            if i >= len(BOUNDS):
                return low
            return low + (BOUNDS[i] - low) * (rank - seen) / count
        seen += count
    return BOUNDS[-1]


def merge_buckets(rows: Sequence[Sequence[int]]) -> list[int]:
    """Element-wise sum of histograms (missing tail buckets count as 0)."""
    out = [0] * (len(BOUNDS) + 1)
    for buckets in rows:
        for i, count in enumerate(list(buckets)[: len(out)]):
            out[i] += int(count)
    return out
