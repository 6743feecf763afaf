"""HistoryRecorder: per-minute rollups in memory, their flush rows, and percentiles."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker_core.history import BOUNDS, HistoryRecorder, merge_buckets, percentile


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FailingQueue:
    def __init__(self) -> None:
        self.fail = True
        self.rows: list[Any] = []

    async def record_history(self, rows: list[Any]) -> None:
        if self.fail:
            raise ConnectionError("database down")
        self.rows.extend(rows)


def test_outcomes_and_stages_land_in_their_minute_rows() -> None:
    clock = Clock(1_800_000_030.0)  # 30 s into a minute
    rec = HistoryRecorder(clock=clock)
    rec.job("docs", "default", "succeeded", 0.2)
    rec.job("docs", "default", "retried", 0.02)
    rec.job("docs", "default", "deferred", 0.02)
    rec.job("docs", "default", "dead", 400.0)
    rec.stage("docs", "default", "parse", True, 0.1)
    rec.stage("docs", "default", "parse", False, 0.1)
    clock.now += 40  # the next minute
    rec.job("docs", "default", "succeeded", 0.001)
    rows = {(r[0], r[3]): r for r in rec.take()}
    minute = 1_800_000_000 // 60 * 60
    job = rows[(minute, "")]
    # succeeded, failed, retried, deferred, dead_lettered
    assert job[4:9] == (1, 3, 1, 1, 1)
    assert job[9] == pytest.approx(400.24)
    assert sum(job[10]) == 4 and job[10][-1] == 1  # 400 s is past the last bound
    assert rows[(minute, "parse")][4:6] == (1, 1)
    assert rows[(minute + 60, "")][4] == 1
    assert len(rec) == 0


def test_unknown_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown outcome"):
        HistoryRecorder().job("q", "default", "exploded", 1.0)


def test_non_finite_durations_count_as_zero() -> None:
    rec = HistoryRecorder(clock=Clock())
    rec.job("q", "default", "succeeded", float("nan"))
    rec.job("q", "default", "succeeded", float("inf"))
    rec.job("q", "default", "succeeded", -3.0)
    (row,) = rec.take()
    assert row[9] == 0.0 and row[10][0] == 3


async def test_failed_flush_keeps_rows_and_merges_new_ones() -> None:
    clock = Clock()
    rec = HistoryRecorder(clock=clock)
    queue = FailingQueue()
    rec.job("q", "default", "succeeded", 0.1)
    with pytest.raises(ConnectionError):
        await rec.flush(queue)  # type: ignore[arg-type]
    rec.job("q", "default", "succeeded", 0.1)
    queue.fail = False
    assert await rec.flush(queue) == 1  # type: ignore[arg-type]
    (row,) = queue.rows
    assert row[4] == 2 and sum(row[10]) == 2
    assert await rec.flush(queue) == 0  # type: ignore[arg-type]


async def test_failed_flushes_keep_at_most_max_minutes() -> None:
    clock = Clock()
    rec = HistoryRecorder(clock=clock, max_minutes=3)
    queue = FailingQueue()
    for _ in range(5):
        rec.job("q", "default", "succeeded", 0.1)
        with pytest.raises(ConnectionError):
            await rec.flush(queue)  # type: ignore[arg-type]
        clock.now += 60
    assert len({key[0] for key in rec.take()}) == 3
    assert rec.dropped == 2


def test_names_are_capped() -> None:
    rec = HistoryRecorder(clock=Clock())
    for i in range(300):
        rec.stage("q", "default", f"stage-{i}", True, 0.1)
    stages = {row[3] for row in rec.take()}
    assert "other" in stages
    assert len(stages) <= 201


def test_percentile_interpolates_inside_the_bucket() -> None:
    buckets = [0] * (len(BOUNDS) + 1)
    buckets[BOUNDS.index(1.0)] = 10  # ten durations in (0.5, 1.0]
    assert percentile(buckets, 0.5) == pytest.approx(0.75)
    assert percentile([0] * (len(BOUNDS) + 1), 0.5) is None
    overflow = [0] * len(BOUNDS) + [5]
    assert percentile(overflow, 0.95) == BOUNDS[-1]


@given(st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=200))
def test_percentile_is_within_the_observed_bucket_range(values: list[float]) -> None:
    rec = HistoryRecorder(clock=Clock())
    for v in values:
        rec.job("q", "default", "succeeded", v)
    (row,) = rec.take()
    p50, p95 = percentile(row[10], 0.5), percentile(row[10], 0.95)
    assert p50 is not None and p95 is not None
    assert 0 <= p50 <= p95 <= BOUNDS[-1]


def test_merge_buckets_adds_element_wise() -> None:
    n = len(BOUNDS) + 1
    assert merge_buckets([[1] * n, [2] * n, [1]]) == [4] + [3] * (n - 1)
