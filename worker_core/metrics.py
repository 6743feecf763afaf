"""ProcessingMetrics: a worker's counters and duration histograms, and their Prometheus export.

Counters, running sums and fixed-bucket histograms only (no per-job lists), and
every label set is capped (error types, stages, breakers), so memory does not grow
however long the worker runs. ``summary()`` is the dict of DESIGN.md section 8.

The export needs nothing at recording time: ``MetricsCollector`` reads a
``ProcessingMetrics`` (and, when given, its worker: breakers, pool, database) when
scraped and yields metric families labelled by queue, stage, outcome, breaker and
error type, never by job. ``render()`` writes the Prometheus text format without
any dependency; with prometheus-client installed (the ``metrics`` extra) the
collector also plugs into a ``CollectorRegistry`` through ``register_metrics``,
which registers one aggregating collector per registry, so many workers in one
process never register the same names twice.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .queue import Queue
    from .snapshot import WorkerView

__all__ = [
    "MetricFamily",
    "MetricsCollector",
    "ProcessingMetrics",
    "register_metrics",
    "render_text",
    "unregister_metrics",
]

#: Upper bounds (seconds) of the duration histograms; jobs run from milliseconds to minutes.
BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0,
)  # fmt: skip
_MAX_ERROR_TYPES = 200
_MAX_STAGES = 200
_MAX_BREAKERS = 200
_MAX_NAME = 120
_OTHER = "other"
_OUTCOMES = ("retried", "deferred", "dead")
_BREAKER_VALUE = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


class _Histogram:
    """Fixed buckets: counts per bucket (not cumulative), sum and count."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.count += 1
        self.sum += seconds

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else 0.0


class _StageStats:
    __slots__ = ("completed", "failed")

    def __init__(self) -> None:
        self.completed = _Histogram()
        self.failed = _Histogram()


def _capped(name: str, table: dict[str, Any], cap: int) -> str:
    """``name`` (shortened), or ``other`` once ``table`` holds ``cap`` names."""
    name = str(name)[:_MAX_NAME] or "?"
    return name if name in table or len(table) < cap else _OTHER


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
        self.pruned = 0
        self.vacuums = 0
        self.analyzes = 0
        self.claimed = 0
        self.in_flight = 0
        self.loop_stalls = 0
        self.unstorable = 0
        # Attempt durations by outcome: succeeded, retried, deferred, dead.
        self._jobs = {name: _Histogram() for name in ("succeeded", *_OUTCOMES)}
        self._claims = _Histogram()
        self._stages: dict[str, _StageStats] = {}
        self._errors: dict[str, int] = {}
        self._breaker_states: dict[str, str] = {}
        self._breaker_changes: dict[tuple[str, str], int] = {}
        self._collector: MetricsCollector | None = None

    # -- recording (called by the worker) -------------------------------------------
    def job_claimed(self, n: int = 1) -> None:
        self.claimed += n

    def claim_completed(self, seconds: float, n: int = 0) -> None:
        """One claim statement took ``seconds`` and returned ``n`` jobs."""
        self._claims.observe(seconds)

    def job_started(self) -> None:
        self.in_flight += 1

    def job_ended(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def job_succeeded(self, seconds: float) -> None:
        self.processed += 1
        self._jobs["succeeded"].observe(seconds)

    def attempt_failed(self, error_type: str, seconds: float, outcome: str) -> None:
        """An attempt raised; ``outcome`` is retried, deferred or dead."""
        self.failed += 1
        if outcome == "retried":
            self.retried += 1
        elif outcome == "deferred":
            self.deferred += 1
        elif outcome == "dead":
            self.dead_lettered += 1
        hist = self._jobs.get(outcome)
        if hist is not None:  # an unknown outcome still counts as a failed attempt
            hist.observe(seconds)
        key = _capped(error_type, self._errors, _MAX_ERROR_TYPES)
        self._errors[key] = self._errors.get(key, 0) + 1

    def job_released(self, n: int = 1) -> None:
        self.released += n

    def lease_lost(self, n: int = 1) -> None:
        self.leases_lost += n

    def jobs_rescued(self, n: int) -> None:
        self.rescued += n

    def loop_stalled(self) -> None:
        """The event loop was blocked past ``queue.stall_warning_seconds``."""
        self.loop_stalls += 1

    def outcome_unstorable(self) -> None:
        """An outcome could not be written; its job was dead-lettered instead."""
        self.unstorable += 1

    def jobs_pruned(self, n: int) -> None:
        """Finished jobs deleted by retention."""
        self.pruned += n

    def table_vacuumed(self) -> None:
        """The jobs table was vacuumed by this worker (dead rows over the threshold)."""
        self.vacuums += 1

    def table_analyzed(self) -> None:
        """The jobs table was analyzed by this worker (it outgrew its statistics)."""
        self.analyzes += 1

    def stage_completed(self, stage: str, seconds: float) -> None:
        self._stage(stage).completed.observe(seconds)

    def stage_failed(self, stage: str, seconds: float) -> None:
        self._stage(stage).failed.observe(seconds)

    def breaker_changed(self, name: str, old: Any, new: Any) -> None:
        """A ``CircuitBreaker`` listener: ``registry.add_listener(metrics.breaker_changed)``."""
        key = _capped(name, self._breaker_states, _MAX_BREAKERS)
        state = str(new)
        self._breaker_states[key] = state
        change = (key, state)
        self._breaker_changes[change] = self._breaker_changes.get(change, 0) + 1

    def _stage(self, stage: str) -> _StageStats:
        stats = self._stages.get(stage)
        if stats is None:
            key = _capped(stage, self._stages, _MAX_STAGES)
            stats = self._stages.get(key)
            if stats is None:
                stats = self._stages[key] = _StageStats()
        return stats

    # -- reading ------------------------------------------------------------------
    @property
    def total(self) -> int:
        return self.processed + self.failed

    def summary(self) -> dict[str, Any]:
        """Counts and averages: processed, failed, total, retried, deferred, dead_lettered,
        avg_seconds, stages, errors (plus released, leases_lost, rescued, claimed, in_flight,
        loop_stalls, unstorable)."""
        attempts = sum(h.count for h in self._jobs.values())
        seconds = sum(h.sum for h in self._jobs.values())
        return {
            "processed": self.processed,
            "failed": self.failed,
            "total": self.total,
            "retried": self.retried,
            "deferred": self.deferred,
            "dead_lettered": self.dead_lettered,
            "avg_seconds": round(seconds / attempts if attempts else 0.0, 6),
            "stages": {
                name: {
                    "completed": s.completed.count,
                    "failed": s.failed.count,
                    "avg_seconds": round(
                        (s.completed.sum + s.failed.sum)
                        / max(1, s.completed.count + s.failed.count),
                        6,
                    ),
                }
                for name, s in sorted(self._stages.items())
            },
            "errors": dict(sorted(self._errors.items())),
            "released": self.released,
            "leases_lost": self.leases_lost,
            "rescued": self.rescued,
            "pruned": self.pruned,
            "vacuums": self.vacuums,
            "analyzes": self.analyzes,
            "claimed": self.claimed,
            "in_flight": self.in_flight,
            "loop_stalls": self.loop_stalls,
            "unstorable": self.unstorable,
        }

    def collector(
        self, *, worker: WorkerView | None = None, queue: Queue | None = None
    ) -> MetricsCollector:
        """This object's ``MetricsCollector`` (one per ProcessingMetrics; ``worker`` and
        ``queue``, when given, are remembered for later scrapes)."""
        if self._collector is None:
            self._collector = MetricsCollector(self, worker=worker, queue=queue)
        else:
            self._collector.attach(worker=worker, queue=queue)
        return self._collector

    def __repr__(self) -> str:
        return f"ProcessingMetrics(processed={self.processed}, failed={self.failed})"


# -- families ------------------------------------------------------------------------
Kind = Literal["counter", "gauge", "histogram"]
Labels = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class MetricFamily:
    """One metric and its samples ``(suffix, labels, value)``, independent of any client.

    ``merge`` says how the same sample of two workers in one process combines:
    ``sum`` (counts) or ``max`` (one shared fact, such as the queue depth).
    """

    name: str
    kind: Kind
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)
    merge: Literal["sum", "max"] = "sum"

    def add(self, labels: Labels, value: float) -> None:
        self.samples.append(("_total" if self.kind == "counter" else "", labels, float(value)))

    def add_histogram(self, labels: Labels, hist: _Histogram) -> None:
        running = 0
        for bound, count in zip((*BUCKETS, math.inf), hist.buckets, strict=True):
            running += count
            self.samples.append(("_bucket", (*labels, ("le", _number(bound))), float(running)))
        self.samples.append(("_sum", labels, hist.sum))
        self.samples.append(("_count", labels, float(hist.count)))


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_text(families: Iterable[MetricFamily]) -> str:
    """The Prometheus text exposition (format 0.0.4) of ``families``."""
    lines: list[str] = []
    for fam in families:
        shown = f"{fam.name}_total" if fam.kind == "counter" else fam.name
        lines.append(f"# HELP {shown} {_escape(fam.help)}")
        lines.append(f"# TYPE {shown} {fam.kind}")
        for suffix, labels, value in fam.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{fam.name}{suffix}{{{text}}} {_number(value)}" if text else
                         f"{fam.name}{suffix} {_number(value)}")  # fmt: skip
    return "\n".join(lines) + "\n"


def merge_families(groups: Iterable[list[MetricFamily]]) -> list[MetricFamily]:
    """Combine the families of several collectors (same name: samples summed or maxed)."""
    merged: dict[str, MetricFamily] = {}
    values: dict[str, dict[tuple[str, Labels], float]] = {}
    for families in groups:
        for fam in families:
            into = merged.setdefault(
                fam.name, MetricFamily(fam.name, fam.kind, fam.help, merge=fam.merge)
            )
            table = values.setdefault(fam.name, {})
            for suffix, labels, value in fam.samples:
                key = (suffix, labels)
                old = table.get(key)
                if old is None:
                    table[key] = value
                else:
                    table[key] = old + value if into.merge == "sum" else max(old, value)
    for name, fam in merged.items():
        fam.samples = [(s, labels, v) for (s, labels), v in values[name].items()]
    return list(merged.values())


# Pool statistics (psycopg_pool ``get_stats()``): levels are gauges, the rest counters.
_POOL_GAUGES = ("pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting")
_POOL_COUNTERS = (
    "requests_num", "requests_queued", "requests_wait_ms", "requests_errors", "usage_ms",
    "connections_num", "connections_ms", "connections_errors", "connections_lost", "returns_bad",
)  # fmt: skip


class MetricsCollector:
    """Metric families of one ``ProcessingMetrics``, its worker and its database.

    Counters and histograms come from the metrics object; breakers, liveness and
    pool statistics from the worker's ``snapshot()`` when scraped; queue depth, the age
    of the oldest ready job and table hygiene from the last ``await refresh()``
    (values older than ``stale_after`` seconds are left out rather than shown stale).
    It is a prometheus-client collector (``collect``/``describe``) too.
    """

    def __init__(
        self,
        metrics: ProcessingMetrics,
        *,
        worker: WorkerView | None = None,
        queue: Queue | None = None,
        namespace: str = "worker_core",
        stale_after: float = 300.0,
    ) -> None:
        self.metrics = metrics
        self.namespace = namespace
        self.stale_after = stale_after
        self._worker: Callable[[], WorkerView | None] | None = None
        self._queue = queue
        self._db: tuple[float, dict[str, float], dict[str, Any]] | None = None
        self._db_up: float | None = None
        #: (alert, subject, 1.0 firing / 0.0) from the fleet's stored alert states.
        self._alerts: list[tuple[str, str, float]] = []
        self.attach(worker=worker, queue=queue)

    def attach(self, *, worker: WorkerView | None = None, queue: Queue | None = None) -> None:
        if worker is not None:
            try:  # a weak reference: metrics must not keep a finished worker alive
                self._worker = weakref.ref(worker)
            except TypeError:
                self._worker = lambda: worker
        if queue is not None:
            self._queue = queue

    @property
    def worker(self) -> WorkerView | None:
        return self._worker() if self._worker is not None else None

    def _current_queue(self) -> Queue | None:
        worker = self.worker
        if worker is not None:
            queue = worker.snapshot().queue
            if queue is not None:
                return queue
        return self._queue

    async def refresh(self, timeout: float = 1.0) -> bool:
        """Read queue depth and table hygiene from the database within ``timeout`` s."""
        queue = self._current_queue()
        if queue is None:
            self._db_up = None
            return False
        try:
            async with asyncio.timeout(timeout):
                depth = await queue.depth()  # every queue of the worker
                hygiene = await queue.table_health()
                self._alerts = await queue.firing_alerts()
        except Exception:
            self._db_up = 0.0
            self._db = None
            return False
        self._db_up = 1.0
        self._db = (time.monotonic(), depth, hygiene)
        return True

    # -- families ------------------------------------------------------------------
    def families(self) -> list[MetricFamily]:
        """Every family of this collector, samples included."""
        m, fam = self.metrics, self._family
        q: Labels = (("queue", m.queue),)
        jobs = fam("jobs", "counter", "Jobs by outcome: succeeded, retried, deferred, dead "
                   "(attempts), released, lease_lost, rescued, pruned, unstorable.")  # fmt: skip
        for outcome, value in (
            ("succeeded", m.processed), ("retried", m.retried), ("deferred", m.deferred),
            ("dead", m.dead_lettered), ("released", m.released),
            ("lease_lost", m.leases_lost), ("rescued", m.rescued), ("pruned", m.pruned),
            ("unstorable", m.unstorable),
        ):  # fmt: skip
            jobs.add((*q, ("outcome", outcome)), value)
        stalls = fam(
            "event_loop_stalls", "counter", "Event loop blocked past queue.stall_warning_seconds."
        )
        stalls.add(q, m.loop_stalls)
        claimed = fam("jobs_claimed", "counter", "Jobs claimed from the queue.")
        claimed.add(q, m.claimed)
        vacuums = fam("table_vacuums", "counter", "VACUUMs of the jobs table run by this worker.")
        vacuums.add(q, m.vacuums)
        analyzes = fam(
            "table_analyzes", "counter", "ANALYZEs of the grown jobs table run by this worker."
        )
        analyzes.add(q, m.analyzes)
        errors = fam("attempt_errors", "counter", "Failed attempts by exception type (capped).")
        for error_type, count in list(m._errors.items()):
            errors.add((*q, ("error_type", error_type)), count)
        durations = fam("job_duration_seconds", "histogram", "Attempt duration by outcome.")
        for outcome, hist in m._jobs.items():
            durations.add_histogram((*q, ("outcome", outcome)), hist)
        stages = fam("stage_duration_seconds", "histogram", "Stage duration by result.")
        for stage, stats in list(m._stages.items()):
            stages.add_histogram((*q, ("stage", stage), ("result", "completed")), stats.completed)
            stages.add_histogram((*q, ("stage", stage), ("result", "failed")), stats.failed)
        claims = fam("claim_duration_seconds", "histogram", "Duration of one claim statement.")
        claims.add_histogram(q, m._claims)
        in_flight = fam("jobs_in_flight", "gauge", "Jobs running in this process now.")
        in_flight.add(q, m.in_flight)
        out = [jobs, claimed, stalls, errors, durations, stages, claims, in_flight]
        out += self._breaker_families(q)
        out += self._worker_families(q)
        out += self._database_families(q)
        return out

    def _family(
        self, name: str, kind: Kind, text: str, merge: Literal["sum", "max"] = "sum"
    ) -> MetricFamily:
        return MetricFamily(f"{self.namespace}_{name}", kind, text, merge=merge)

    def _breaker_families(self, q: Labels) -> list[MetricFamily]:
        fam = self._family
        state = fam(
            "breaker_state", "gauge", "Circuit state: 0 closed, 1 half-open, 2 open.", "max"
        )
        states = dict(self.metrics._breaker_states)
        worker = self.worker
        if worker is not None:
            breakers = list(worker.snapshot().breakers.items())
            for name, breaker in breakers[:_MAX_BREAKERS]:
                states[str(name)[:_MAX_NAME]] = breaker.state.value
        for name, value in states.items():
            state.add((*q, ("breaker", name)), _BREAKER_VALUE.get(value, 2.0))
        changes = fam("breaker_transitions", "counter", "Circuit state changes by new state.")
        for (name, new), count in list(self.metrics._breaker_changes.items()):
            changes.add((*q, ("breaker", name), ("state", new)), count)
        return [state, changes]

    def _worker_families(self, q: Labels) -> list[MetricFamily]:
        fam = self._family
        worker = self.worker
        if worker is None:
            return []
        snapshot = worker.snapshot()
        now = time.monotonic()
        running = fam("worker_running", "gauge", "1 while the worker runs.")
        running.add(q, float(snapshot.running))
        draining = fam("worker_draining", "gauge", "1 while the worker shuts down.")
        draining.add(q, float(snapshot.draining))
        out = [running, draining]
        if snapshot.last_claim_at is not None:
            age = fam("last_claim_age_seconds", "gauge", "Seconds since the last claim.", "max")
            age.add(q, max(0.0, now - snapshot.last_claim_at))
            out.append(age)
        pool = None
        if snapshot.queue is not None:
            try:
                pool = snapshot.queue.pool
            except RuntimeError:
                pool = None
        if pool is not None:
            stats = pool.get_stats()
            for key in _POOL_GAUGES:
                g = fam(f"pool_{key.removeprefix('pool_')}", "gauge", f"psycopg pool {key}.")
                g.add(q, float(stats.get(key, 0)))
                out.append(g)
            for key in _POOL_COUNTERS:
                c = fam(f"pool_{key}", "counter", f"psycopg pool {key} since it opened.")
                c.add(q, float(stats.get(key, 0)))
                out.append(c)
        return out

    def _database_families(self, q: Labels) -> list[MetricFamily]:
        fam = self._family
        out: list[MetricFamily] = []
        if self._db_up is not None:
            up = fam("database_up", "gauge", "1 when the last scrape reached the database.", "max")
            up.add(q, self._db_up)
            out.append(up)
        if self._db is None or time.monotonic() - self._db[0] > self.stale_after:
            return out
        _, depth, hygiene = self._db
        jobs = fam(
            "queue_jobs", "gauge", "Jobs of this queue by state (ready, scheduled, running).", "max"
        )
        for state in ("ready", "scheduled", "running"):
            jobs.add((*q, ("state", state)), float(depth.get(state, 0.0)))
        age = fam("queue_oldest_ready_age_seconds", "gauge",
                  "How long the oldest ready job has waited.", "max")  # fmt: skip
        age.add(q, float(depth.get("oldest_ready_age", 0.0)))
        out += [jobs, age]
        if self._alerts:
            text = "1 while the alert fires (fleet-wide; breaker_open_seconds: queue=breaker)."
            firing = fam("alert_firing", "gauge", text, "max")
            for alert, subject, is_firing in self._alerts:
                firing.add((("alert", alert), ("queue", subject)), is_firing)
            out.append(firing)
        queue = self._current_queue()
        s: Labels = (("schema", queue.schema if queue is not None else ""),)
        for key, name, text in (
            ("n_live_tup", "jobs_table_live_tuples", "Live rows of the jobs table."),
            ("n_dead_tup", "jobs_table_dead_tuples", "Dead rows of the jobs table (to vacuum)."),
            ("oldest_xmin_age", "database_oldest_xmin_age",
             "Age (transactions) of the oldest snapshot holding back vacuum."),
            ("oldest_transaction_seconds", "database_oldest_transaction_seconds",
             "Duration of the oldest open transaction."),
        ):  # fmt: skip
            value = hygiene.get(key)
            if value is not None:
                g = fam(name, "gauge", text, "max")
                g.add(s, float(value))
                out.append(g)
        return out

    def render(self) -> str:
        """The Prometheus text exposition of ``families()`` (no dependency needed)."""
        return render_text(self.families())

    # -- prometheus-client collector protocol ----------------------------------------
    def collect(self) -> Iterator[Any]:
        yield from _to_client(self.families())

    def describe(self) -> list[Any]:
        return []  # names vary with the worker; register_metrics guards duplicates


def _to_client(families: Iterable[MetricFamily]) -> Iterator[Any]:
    from prometheus_client.metrics_core import Metric

    for fam in families:
        metric = Metric(fam.name, fam.help, fam.kind)
        for suffix, labels, value in fam.samples:
            metric.add_sample(fam.name + suffix, dict(labels), value)
        yield metric


class _Hub:
    """The one collector worker_core registers in a registry: merges its sources."""

    def __init__(self) -> None:
        self.sources: weakref.WeakSet[MetricsCollector] = weakref.WeakSet()

    def collect(self) -> Iterator[Any]:
        yield from _to_client(merge_families(s.families() for s in list(self.sources)))

    def describe(self) -> list[Any]:
        # A scrape-shaped dry run, so the registry still detects clashing names.
        probe = MetricsCollector(ProcessingMetrics())
        return list(_to_client(probe.families()))


_hubs: weakref.WeakKeyDictionary[Any, _Hub] = weakref.WeakKeyDictionary()
_hubs_lock = threading.Lock()


def register_metrics(
    metrics: ProcessingMetrics, registry: Any = None, *, worker: WorkerView | None = None
) -> MetricsCollector:
    """Export ``metrics`` (and ``worker``'s live state) through a prometheus-client registry.

    ``registry`` defaults to prometheus-client's global ``REGISTRY``. worker_core
    registers one collector per registry, ever; each call adds a source to it, and
    the same queue's samples of several workers in one process are summed. A
    source goes away with its metrics object, or through ``unregister_metrics``.
    """
    from prometheus_client import REGISTRY

    registry = REGISTRY if registry is None else registry
    collector = metrics.collector(worker=worker)
    with _hubs_lock:
        hub = _hubs.get(registry)
        if hub is None:
            hub = _Hub()
            registry.register(hub)
            _hubs[registry] = hub
        hub.sources.add(collector)
    return collector


def unregister_metrics(metrics: ProcessingMetrics, registry: Any = None) -> None:
    """Stop exporting ``metrics`` through ``registry`` (default: the global one)."""
    from prometheus_client import REGISTRY

    registry = REGISTRY if registry is None else registry
    with _hubs_lock:
        hub = _hubs.get(registry)
        if hub is not None and metrics._collector is not None:
            hub.sources.discard(metrics._collector)
