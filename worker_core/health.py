"""Health: the checks of a worker's components, their aggregation, and the report.

``check_worker(worker)`` (what ``await worker.health()`` returns) reads the
worker's typed ``WorkerSnapshot`` and checks the
database (a ``SELECT 1`` round trip within ``health.database_timeout``, plus the
hygiene of the jobs table: dead tuples and the oldest transaction or snapshot
holding back vacuum), the worker's loop, every circuit breaker, storage, and the
checks added with ``add_health_check``. Any unhealthy component makes the report
unhealthy, else any degraded one makes it degraded. ``health_report_for_config``
checks the database and the queue without a running worker (``worker-core
health``). Every check is bounded by a timeout, and every detail is masked with
``worker_core.redact`` before it leaves the process. The HTTP endpoints live in
``worker_core.server``.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from .redact import Redactor, redact_text

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

    from .breaker import CircuitBreaker
    from .config import WorkerConfig
    from .queue import Queue
    from .server import HealthServer as HealthServer
    from .snapshot import WorkerSnapshot, WorkerView

__all__ = [
    "ComponentHealth",
    "HealthReport",
    "HealthServer",
    "HealthStatus",
    "HealthThresholds",
    "check_database",
    "check_loop",
    "check_worker",
    "health_report_for_config",
]

Check = Callable[[], Awaitable[Any]]


class HealthStatus(enum.StrEnum):
    """How a component, or the whole worker, is doing; ``str(status)`` is its value."""

    #: Working as intended.
    HEALTHY = "healthy"
    #: Working, but something needs attention (an open circuit, vacuum held back, draining).
    DEGRADED = "degraded"
    #: Not working (database unreachable, loop stuck, a check failed).
    UNHEALTHY = "unhealthy"

    def __str__(self) -> str:
        return self.value


_RANK = {HealthStatus.HEALTHY: 0, HealthStatus.DEGRADED: 1, HealthStatus.UNHEALTHY: 2}


def aggregate(statuses: Iterable[HealthStatus]) -> HealthStatus:
    """Any unhealthy: unhealthy; else any degraded: degraded; else healthy."""
    return max(statuses, key=_RANK.__getitem__, default=HealthStatus.HEALTHY)


@dataclass(frozen=True, slots=True)
class ComponentHealth:
    """One component: its status, how long the check took, and a JSON-able detail."""

    status: HealthStatus
    latency_ms: float | None = None
    detail: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", HealthStatus(self.status))

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status.value, "latency_ms": self.latency_ms, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The aggregated status and every component; ``to_dict()`` is JSON-able."""

    status: HealthStatus
    components: dict[str, ComponentHealth]
    checked_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    duration_ms: float = 0.0
    worker_id: str | None = None

    @property
    def healthy(self) -> bool:
        return self.status is HealthStatus.HEALTHY

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "checked_at": self.checked_at.isoformat(),
            "duration_ms": self.duration_ms,
            "worker_id": self.worker_id,
            "components": {name: c.to_dict() for name, c in self.components.items()},
        }


@dataclass(frozen=True, slots=True)
class HealthThresholds:
    """Where a healthy component becomes degraded or unhealthy.

    Fields left ``None`` are derived from the config. A ``health`` config section
    with fields of the same names overrides the defaults.
    """

    #: Dead tuples on the jobs table, with ``max_dead_ratio`` of its rows dead: degraded.
    max_dead_tuples: int = 100_000
    max_dead_ratio: float = 0.5
    #: A transaction open this long (s) holds back vacuum: degraded.
    max_transaction_seconds: float = 300.0
    #: A snapshot (session, prepared transaction, replication slot) this old (in
    #: transactions) holds back vacuum: degraded.
    max_xmin_age: int = 50_000_000
    #: The claim loop silent this long (s) is stuck: unhealthy.
    loop_stall_seconds: float | None = None
    #: The LISTEN connection down this long after start (s): degraded (polling only).
    listener_grace_seconds: float = 30.0
    #: Timeout (s) of each user check and of storage; default ``health.database_timeout``.
    check_timeout: float | None = None

    @classmethod
    def from_config(cls, config: WorkerConfig) -> HealthThresholds:
        section = config.health
        given = {
            f.name: getattr(section, f.name)
            for f in fields(cls)
            if getattr(section, f.name, None) is not None
        }
        return cls(**given)

    def stall_seconds(self, config: WorkerConfig) -> float:
        if self.loop_stall_seconds is not None:
            return self.loop_stall_seconds
        # One loop turn may wait a poll interval, or a pool timeout when the
        # database is slow; only far beyond both is the loop stuck.
        return max(60.0, 10 * config.queue.poll_interval, 3 * config.database.connect_timeout)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _error(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact_text(f"{type(exc).__name__}: {text}", secrets)[:500]


# -- database ------------------------------------------------------------------------
class _OneConnection:
    """Lends one connection where Queue expects a pool (a health check needs no pool)."""

    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn

    @asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[Any]:
        yield self._conn

    def get_stats(self) -> dict[str, int]:
        return {}


@asynccontextmanager
async def _connect(config: WorkerConfig, timeout: float) -> AsyncIterator[Queue]:
    """A Queue on one fresh connection, for checks without a running worker."""
    from psycopg import AsyncConnection

    from .queue import Queue

    dsn = config.dsn()
    conn = await AsyncConnection.connect(
        dsn,
        autocommit=True,
        prepare_threshold=config.database.prepare_threshold,
        application_name=f"{config.database.application_name}.health"[:63],
        **{
            **config.database.connection_params(dsn),
            "connect_timeout": max(1, math.ceil(timeout)),
        },
    )
    try:
        pool = cast("AsyncConnectionPool", _OneConnection(conn))
        yield Queue(config, pool=pool)
    finally:
        await conn.close()


async def _ping(queue: Queue) -> tuple[float, float]:
    """Seconds to get a connection, and of one ``SELECT 1`` round trip."""
    started = time.perf_counter()
    async with queue.connection() as conn:
        acquired = time.perf_counter()
        await conn.execute("SELECT 1")
        return acquired - started, time.perf_counter() - acquired


def judge_hygiene(
    hygiene: Mapping[str, Any], thresholds: HealthThresholds, schema: str
) -> tuple[list[str], dict[str, Any]]:
    """Problems found in ``Queue.table_health()`` numbers, and the numbers worth showing."""
    if not hygiene:
        return [f"no jobs table in schema {schema!r}: run `worker-core migrate`"], {}
    live = int(hygiene.get("n_live_tup") or 0)
    dead = int(hygiene.get("n_dead_tup") or 0)
    ratio = dead / (live + dead) if live + dead else 0.0
    ages = {
        key: int(hygiene[key])
        for key in ("oldest_xmin_age", "oldest_prepared_xact_age", "oldest_slot_xmin_age")
        if hygiene.get(key) is not None
    }
    transaction = float(hygiene.get("oldest_transaction_seconds") or 0.0)
    vacuumed = [v for v in (hygiene.get("last_autovacuum"), hygiene.get("last_vacuum")) if v]
    detail: dict[str, Any] = {
        "live_tuples": live,
        "dead_tuples": dead,
        "dead_ratio": round(ratio, 3),
        "oldest_transaction_seconds": round(transaction, 3),
        **ages,
        "last_vacuum": max(vacuumed).isoformat() if vacuumed else None,
    }
    problems: list[str] = []
    if dead >= thresholds.max_dead_tuples and ratio >= thresholds.max_dead_ratio:
        problems.append(f"{dead} dead tuples ({ratio:.0%}) on the jobs table: vacuum is behind")
    if transaction > thresholds.max_transaction_seconds:
        problems.append(f"a transaction open for {transaction:.0f}s holds back vacuum")
    for key, age in ages.items():
        if age > thresholds.max_xmin_age:
            what = key.removeprefix("oldest_").removesuffix("_age").replace("_", " ")
            problems.append(f"the oldest {what} is {age} transactions old: it holds back vacuum")
    return problems, detail


async def check_database(
    config: WorkerConfig,
    queue: Queue | None = None,
    *,
    hygiene: bool = True,
    timeout: float | None = None,
    thresholds: HealthThresholds | None = None,
) -> ComponentHealth:
    """A ``SELECT 1`` round trip within ``timeout`` (default ``health.database_timeout``),
    then the jobs table's hygiene within what is left of it.

    Uses ``queue``'s pool when given (what the worker sees), else one fresh connection.
    Unreachable or too slow: unhealthy. Hygiene past ``thresholds``: degraded.
    """
    timeout = config.health.database_timeout if timeout is None else timeout
    thresholds = thresholds or HealthThresholds.from_config(config)
    secrets = config.secrets()
    started = time.perf_counter()
    detail: dict[str, Any] = {"schema": config.database.schema}
    status = HealthStatus.UNHEALTHY
    try:
        async with asyncio.timeout(timeout):
            if queue is None:
                async with _connect(config, timeout) as fresh:
                    detail["connect_ms"] = _ms(time.perf_counter() - started)
                    status = await _database_checks(fresh, detail, hygiene, thresholds)
            else:
                status = await _database_checks(queue, detail, hygiene, thresholds)
    except Exception as exc:
        reason = (
            f"no answer within {timeout:g}s"
            if isinstance(exc, TimeoutError)
            else _error(exc, secrets)
        )
        if "round_trip_ms" in detail:  # reachable; only the hygiene query failed
            status = HealthStatus.DEGRADED
            detail["problems"] = [f"hygiene query failed: {reason}"]
        else:
            detail["error"] = reason
    latency = detail.get("round_trip_ms", _ms(time.perf_counter() - started))
    return ComponentHealth(status, latency, _clean(detail, secrets))


async def _database_checks(
    queue: Queue, detail: dict[str, Any], hygiene: bool, thresholds: HealthThresholds
) -> HealthStatus:
    acquire, round_trip = await _ping(queue)
    detail["acquire_ms"] = _ms(acquire)
    detail["round_trip_ms"] = _ms(round_trip)
    if not hygiene:
        return HealthStatus.HEALTHY
    problems, numbers = judge_hygiene(await queue.table_health(), thresholds, queue.schema)
    detail.update(numbers)
    if problems:
        detail["problems"] = problems
        return HealthStatus.DEGRADED
    return HealthStatus.HEALTHY


# -- worker ---------------------------------------------------------------------------
def check_loop(
    snapshot: WorkerSnapshot,
    config: WorkerConfig,
    *,
    thresholds: HealthThresholds | None = None,
    now: float | None = None,
) -> ComponentHealth:
    """The claim loop: unhealthy when not running or silent past the stall limit;
    degraded while draining or when LISTEN is down past its grace period."""
    thresholds = thresholds or HealthThresholds.from_config(config)
    now = time.monotonic() if now is None else now
    stall = thresholds.stall_seconds(config)
    started = snapshot.started_at
    last_loop = snapshot.last_loop_at
    if started is not None and last_loop is not None and last_loop < started:
        last_loop = None  # from a previous run()

    def ago(t: float | None) -> float | None:
        return None if t is None else round(max(0.0, now - t), 3)

    detail: dict[str, Any] = {
        "worker_id": snapshot.worker_id,
        "running": snapshot.running,
        "draining": snapshot.draining,
        "in_flight": snapshot.in_flight,
        "concurrency": config.queue.concurrency,
        "seconds_since_loop": ago(last_loop),
        "seconds_since_claim": ago(snapshot.last_claim_at),
        "uptime_seconds": ago(started),
        "listener_connected": snapshot.listener_connected,
        "polling_only": snapshot.polling_only,
    }
    status = HealthStatus.HEALTHY
    problem: str | None = None
    if not snapshot.running:
        status, problem = HealthStatus.UNHEALTHY, "the worker is not running"
    elif snapshot.draining:
        status, problem = HealthStatus.DEGRADED, "draining: finishing in-flight jobs"
    elif last_loop is None:
        if started is not None and now - started > stall:
            status, problem = HealthStatus.UNHEALTHY, f"the claim loop has not run in {stall:g}s"
    elif now - last_loop > stall:
        status = HealthStatus.UNHEALTHY
        problem = f"the claim loop has been stuck for {now - last_loop:.0f}s"
    elif (
        not snapshot.listener_connected
        and not snapshot.polling_only
        and started is not None
        and now - started > thresholds.listener_grace_seconds
    ):
        status, problem = HealthStatus.DEGRADED, "LISTEN connection down: polling only"
    if problem:
        detail["problem"] = problem
    return ComponentHealth(status, None, detail)


def check_breaker(breaker: CircuitBreaker) -> ComponentHealth:
    """Closed: healthy; open or half-open (still probing): degraded."""
    from .breaker import CircuitState

    detail = dict(breaker.snapshot())
    state = breaker.state
    detail["state"] = state.value
    detail.setdefault("retry_after", round(breaker.retry_after, 3))
    status = HealthStatus.HEALTHY if state is CircuitState.CLOSED else HealthStatus.DEGRADED
    return ComponentHealth(status, None, detail)


async def run_check(
    check: Callable[[], Any], timeout: float, secrets: Iterable[str] = ()
) -> ComponentHealth:
    """Run a user check within ``timeout``: it may return ComponentHealth, a HealthStatus,
    a bool, a mapping (healthy, as detail) or None (healthy); raising is unhealthy."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            result = check()
            if inspect.isawaitable(result):
                result = await result
    except TimeoutError:
        return ComponentHealth(
            HealthStatus.UNHEALTHY,
            _ms(time.perf_counter() - started),
            {"error": f"no answer within {timeout:g}s"},
        )
    except Exception as exc:
        return ComponentHealth(
            HealthStatus.UNHEALTHY,
            _ms(time.perf_counter() - started),
            {"error": _error(exc, secrets)},
        )
    latency = _ms(time.perf_counter() - started)
    if isinstance(result, ComponentHealth):
        return result if result.latency_ms is not None else replace(result, latency_ms=latency)
    if isinstance(result, HealthStatus):
        return ComponentHealth(result, latency)
    if result is None or result is True:
        return ComponentHealth(HealthStatus.HEALTHY, latency)
    if result is False:
        return ComponentHealth(HealthStatus.UNHEALTHY, latency, {"error": "check returned False"})
    if isinstance(result, Mapping):
        return ComponentHealth(HealthStatus.HEALTHY, latency, dict(result))
    return ComponentHealth(HealthStatus.HEALTHY, latency, str(result)[:500])


def _clean(detail: Any, secrets: Iterable[str]) -> Any:
    return Redactor(secrets=secrets).value(detail)


_BUILTIN = ("database", "worker")


async def check_worker(
    worker: WorkerView,
    *,
    thresholds: HealthThresholds | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> HealthReport:
    """The health of a worker: database, worker loop, ``breaker:<name>`` per breaker,
    and the checks added with ``add_health_check`` (``storage`` among them when the
    worker has storage)."""
    config = worker.config
    snapshot = worker.snapshot()
    thresholds = thresholds or HealthThresholds.from_config(config)
    secrets = config.secrets()
    timeout = thresholds.check_timeout or config.health.database_timeout
    started = time.perf_counter()
    checked_at = datetime.now(UTC)

    checks: dict[str, Check] = {}
    for name, check in snapshot.health_checks.items():
        checks[f"check:{name}" if name in _BUILTIN else name] = check

    names = ["database", *checks]
    results = await asyncio.gather(
        check_database(config, snapshot.queue, thresholds=thresholds),
        *(run_check(check, timeout, secrets) for check in checks.values()),
    )
    components: dict[str, ComponentHealth] = {
        "database": results[0],
        "worker": check_loop(snapshot, config, thresholds=thresholds, now=clock()),
    }
    for name, breaker in sorted(snapshot.breakers.items()):
        components[f"breaker:{name}"] = check_breaker(breaker)
    for name, result in zip(names[1:], results[1:], strict=True):
        components[name] = result
    return _report(components, secrets, started, checked_at, worker.worker_id)


def _report(
    components: dict[str, ComponentHealth],
    secrets: Iterable[str],
    started: float,
    checked_at: datetime,
    worker_id: str | None,
) -> HealthReport:
    redactor = Redactor(secrets=secrets)
    clean = {name: replace(c, detail=redactor.value(c.detail)) for name, c in components.items()}
    return HealthReport(
        aggregate(c.status for c in clean.values()),
        clean,
        checked_at,
        _ms(time.perf_counter() - started),
        worker_id,
    )


async def health_report_for_config(
    config: WorkerConfig, *, thresholds: HealthThresholds | None = None
) -> HealthReport:
    """Database and queue health without a running worker (``worker-core health``).

    ``database`` is a round trip and the jobs table's hygiene on one fresh
    connection, bounded by ``health.database_timeout``; ``queue`` shows the
    ready, scheduled and running jobs and the age of the oldest ready job.
    """
    thresholds = thresholds or HealthThresholds.from_config(config)
    secrets = config.secrets()
    started = time.perf_counter()
    checked_at = datetime.now(UTC)
    timeout = config.health.database_timeout
    database = await check_database(config, thresholds=thresholds)
    components = {"database": database}
    if database.status is not HealthStatus.UNHEALTHY:
        components["queue"] = await run_check(
            lambda: _queue_depth(config, timeout), timeout, secrets
        )
    return _report(components, secrets, started, checked_at, None)


async def _queue_depth(config: WorkerConfig, timeout: float) -> dict[str, Any]:
    async with _connect(config, timeout) as queue:
        depth = await queue.depth()
    names = queue.config.queue.names
    label = names[0] if len(names) == 1 else list(names)
    return {"queue": label, **{k: round(v, 3) for k, v in depth.items()}}


def __getattr__(name: str) -> Any:
    # The HTTP server lives in worker_core.server (aiohttp loads only when it starts);
    # it is reachable from here because BaseWorker imports it from this module.
    if name == "HealthServer":
        from .server import HealthServer

        return HealthServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
