"""ProcessingMetrics: exact summaries, bounded memory, and the Prometheus exposition."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker_core.breaker import CircuitBreaker
from worker_core.config import WorkerConfig
from worker_core.metrics import (
    MetricFamily,
    MetricsCollector,
    ProcessingMetrics,
    register_metrics,
    render_text,
    unregister_metrics,
)
from worker_core.snapshot import WorkerSnapshot


def scripted() -> ProcessingMetrics:
    """7 successes, 3 retries, 2 deferrals and 2 dead letters over two stages."""
    m = ProcessingMetrics("docs")
    m.job_claimed(14)
    for _ in range(7):
        m.job_started()
        m.stage_completed("parse", 0.01)
        m.stage_completed("embed", 0.03)
        m.job_succeeded(0.04)
        m.job_ended()
    for _ in range(3):
        m.stage_failed("embed", 0.5)
        m.attempt_failed("TimeoutError", 0.5, "retried")
    for _ in range(2):
        m.attempt_failed("CircuitOpenError", 0.0, "deferred")
    m.stage_failed("parse", 0.02)
    m.attempt_failed("PermanentError", 0.02, "dead")
    m.attempt_failed("TimeoutError", 1.0, "dead")
    m.job_released(2)
    m.lease_lost()
    m.jobs_rescued(3)
    return m


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def test_summary_counts_are_exact() -> None:
    summary = scripted().summary()
    expected = {
        "processed": 7, "failed": 7, "total": 14, "retried": 3, "deferred": 2,
        "dead_lettered": 2, "released": 2, "leases_lost": 1, "rescued": 3, "claimed": 14,
        "in_flight": 0,
    }  # fmt: skip
    assert {k: summary[k] for k in expected} == expected
    assert summary["errors"] == {"CircuitOpenError": 2, "PermanentError": 1, "TimeoutError": 4}
    assert summary["stages"] == {
        "embed": {"completed": 7, "failed": 3, "avg_seconds": round((7 * 0.03 + 1.5) / 10, 6)},
        "parse": {"completed": 7, "failed": 1, "avg_seconds": round((7 * 0.01 + 0.02) / 8, 6)},
    }
    assert summary["avg_seconds"] == round((7 * 0.04 + 1.5 + 0.02 + 1.0) / 14, 6)


def test_memory_is_bounded_however_many_names() -> None:
    m = ProcessingMetrics()
    for i in range(100_000):
        m.attempt_failed(f"Error{i}", 0.001, "retried")
        m.stage_completed(f"stage{i}", 0.001)
        m.breaker_changed(f"svc{i}", "closed", "open")
    assert len(m.summary()["errors"]) <= 201 and m.summary()["errors"]["other"] > 99_000
    assert len(m._stages) <= 201 and len(m._breaker_states) <= 201
    assert len(m._breaker_changes) <= 201
    m.attempt_failed("X" * 10_000, 0.1, "dead")  # long names are shortened, not stored whole
    assert max(len(k) for k in m._errors) <= 120
    assert m.failed == 100_001


def test_prometheus_text_parses_and_matches_the_summary() -> None:
    m = scripted()
    m.job_started()  # one still in flight
    found = samples(m.collector().render())
    assert value(found, "worker_core_jobs_total", queue="docs", outcome="succeeded") == 7
    assert value(found, "worker_core_jobs_total", queue="docs", outcome="retried") == 3
    assert value(found, "worker_core_jobs_total", queue="docs", outcome="dead") == 2
    assert value(found, "worker_core_jobs_total", queue="docs", outcome="rescued") == 3
    assert value(found, "worker_core_jobs_claimed_total", queue="docs") == 14
    assert (
        value(found, "worker_core_attempt_errors_total", queue="docs", error_type="TimeoutError")
        == 4
    )
    assert value(found, "worker_core_jobs_in_flight", queue="docs") == 1
    assert (
        value(found, "worker_core_job_duration_seconds_count", queue="docs", outcome="succeeded")
        == 7
    )
    assert (
        value(
            found,
            "worker_core_job_duration_seconds_bucket",
            queue="docs",
            outcome="succeeded",
            le="0.05",
        )
        == 7
    )
    assert (
        value(
            found,
            "worker_core_job_duration_seconds_bucket",
            queue="docs",
            outcome="succeeded",
            le="0.025",
        )
        == 0
    )
    assert (
        value(
            found,
            "worker_core_stage_duration_seconds_count",
            queue="docs",
            stage="embed",
            result="failed",
        )
        == 3
    )
    assert (
        value(
            found,
            "worker_core_stage_duration_seconds_bucket",
            queue="docs",
            stage="embed",
            result="completed",
            le="+Inf",
        )
        == 7
    )
    # Labels never carry a job id.
    allowed = {"queue", "outcome", "error_type", "stage", "result", "le", "breaker", "state"}
    assert all({name for name, _ in labels} <= allowed for _, labels in found)


def test_bucket_bounds_are_inclusive() -> None:
    m = ProcessingMetrics("q")
    m.job_succeeded(0.005)
    m.job_succeeded(10_000.0)
    found = samples(m.collector().render())
    assert (
        value(
            found,
            "worker_core_job_duration_seconds_bucket",
            queue="q",
            outcome="succeeded",
            le="0.005",
        )
        == 1
    )
    assert (
        value(
            found,
            "worker_core_job_duration_seconds_bucket",
            queue="q",
            outcome="succeeded",
            le="1800.0",
        )
        == 1
    )
    assert (
        value(
            found,
            "worker_core_job_duration_seconds_bucket",
            queue="q",
            outcome="succeeded",
            le="+Inf",
        )
        == 2
    )


def test_label_values_are_escaped() -> None:
    fam = MetricFamily("x_info", "gauge", 'help with "quotes"\nand a newline')
    fam.add((("name", 'a "b"\\c\nd'),), 1)
    (parsed,) = text_string_to_metric_families(render_text([fam]))
    assert parsed.samples[0].labels == {"name": 'a "b"\\c\nd'}


async def fail() -> None:
    raise ConnectionError("service down")


class FakePool:
    def get_stats(self) -> dict[str, int]:
        return {"pool_min": 1, "pool_max": 10, "pool_size": 4, "pool_available": 3,
                "requests_waiting": 0, "requests_num": 120, "connections_num": 4}  # fmt: skip


class FakeQueue:
    schema = "s"
    pool = FakePool()


class FakeWorker:
    """A ``WorkerView``: metrics read the worker only through its typed snapshot."""

    def __init__(self, metrics: ProcessingMetrics) -> None:
        self.config = WorkerConfig()
        self.worker_id = "fake"
        self.metrics = metrics
        self.breakers: dict[str, CircuitBreaker] = {}

    def snapshot(self) -> WorkerSnapshot:
        return WorkerSnapshot(
            self.worker_id,
            running=True,
            queue=FakeQueue(),  # type: ignore[arg-type]
            breakers=self.breakers,
        )


async def test_worker_gauges_breakers_and_pool() -> None:
    m = ProcessingMetrics("docs")
    worker = FakeWorker(m)
    now = [0.0]
    breaker = CircuitBreaker("embed", fail_max=1, reset_timeout=30, clock=lambda: now[0])
    breaker.add_listener(m.breaker_changed)
    worker.breakers = {"embed": breaker, "s3": CircuitBreaker("s3")}
    with pytest.raises(ConnectionError):
        await breaker.call(fail)
    found = samples(m.collector(worker=worker).render())
    assert value(found, "worker_core_breaker_state", queue="docs", breaker="embed") == 2
    assert value(found, "worker_core_breaker_state", queue="docs", breaker="s3") == 0
    assert (
        value(
            found,
            "worker_core_breaker_transitions_total",
            queue="docs",
            breaker="embed",
            state="open",
        )
        == 1
    )
    assert value(found, "worker_core_pool_size", queue="docs") == 4
    assert value(found, "worker_core_pool_requests_num_total", queue="docs") == 120
    assert value(found, "worker_core_worker_running", queue="docs") == 1
    now[0] = 31.0  # the reset timeout passed: half-open
    found = samples(m.collector().render())
    assert value(found, "worker_core_breaker_state", queue="docs", breaker="embed") == 1


def test_one_collector_per_registry_however_many_workers() -> None:
    registry = CollectorRegistry()
    first, second = ProcessingMetrics("docs"), ProcessingMetrics("docs")
    first.job_succeeded(0.1)
    second.job_succeeded(0.2)
    second.job_succeeded(0.3)
    for metrics in (first, second, second):
        register_metrics(metrics, registry)  # never raises "Duplicated timeseries"
    found = samples(generate_latest(registry).decode())
    assert value(found, "worker_core_jobs_total", queue="docs", outcome="succeeded") == 3
    unregister_metrics(second, registry)
    found = samples(generate_latest(registry).decode())
    assert value(found, "worker_core_jobs_total", queue="docs", outcome="succeeded") == 1


def test_the_default_registry_is_registered_once() -> None:
    from prometheus_client import REGISTRY

    metrics = [ProcessingMetrics(f"default-{i}") for i in range(3)]
    try:
        for m in metrics:
            register_metrics(m)
        text = generate_latest(REGISTRY).decode()
        assert text.count("# TYPE worker_core_jobs_total counter") == 1
        assert 'queue="default-2"' in text
    finally:
        for m in metrics:
            unregister_metrics(m)


def test_collector_protocol_and_weak_worker() -> None:
    m = ProcessingMetrics("q")
    worker = FakeWorker(m)
    collector = MetricsCollector(m, worker=worker)
    assert collector.worker is worker and collector.describe() == []
    names = {metric.name for metric in collector.collect()}
    assert "worker_core_pool_size" in names
    del worker
    assert collector.worker is None  # metrics never keep a finished worker alive


def test_render_needs_no_prometheus_client() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from worker_core.metrics import ProcessingMetrics\n"
        "m = ProcessingMetrics('q'); m.job_succeeded(0.1)\n"
        "print(m.collector().render())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert 'worker_core_jobs_total{queue="q",outcome="succeeded"} 1.0' in done.stdout
