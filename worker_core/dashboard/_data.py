"""What the dashboard shows, read from the database and shaped once for pages and API.

Reads that every client repeats (the overview, the day's history) go through
``Cached``: one load at a time, shared by every request and live stream, reused
for ``min_interval`` seconds, or longer when a load is slow: the next load waits
at least ``cost_factor`` times the last one's duration, so however many browsers
watch, the dashboard keeps its share of the database below about 1/cost_factor.
Job payloads, states and errors are redacted with ``worker_core.redact`` before
they are shaped: no secret reaches a page or the API.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from worker_core.history import merge_buckets, percentile
from worker_core.jobs import Job, JobStatus
from worker_core.queue import Queue
from worker_core.redact import redact_text, redact_value

__all__ = ["STATUSES", "Cached", "ConsoleData", "Schedules"]

T = TypeVar("T")
STATUSES = tuple(s.value for s in JobStatus)
#: The schedules page's data source: returns rows with name, cron, next_run, queue, kind.
Schedules = Callable[[], Awaitable[Sequence[dict[str, Any]]]]


class Cached(Generic[T]):
    """A value loaded by ``load`` and shared until it is ``min_interval`` s old (or
    ``cost_factor`` times its load time, whichever is longer)."""

    def __init__(
        self,
        load: Callable[[], Awaitable[T]],
        *,
        min_interval: float,
        cost_factor: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self.min_interval = min_interval
        self.cost_factor = cost_factor
        self._clock = clock
        self._value: T | None = None
        self._loaded_at = -float("inf")
        self._ttl = min_interval
        self._pending: asyncio.Future[T] | None = None
        #: Increases with every load (live streams send only what changed).
        self.version = 0

    def invalidate(self) -> None:
        """The next ``get`` loads again (after an action changed what it shows)."""
        self._loaded_at = -float("inf")

    def fresh(self) -> bool:
        return self._value is not None and self._clock() - self._loaded_at < self._ttl

    async def get(self) -> T:
        if self._value is not None and self.fresh():
            return self._value
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._reload())
            # Retrieved here too, so a failed load nobody waits for any more is not
            # reported as "never retrieved"; the waiters still get the exception.
            self._pending.add_done_callback(_consume)
        # shield: one caller going away must not cancel the load the others wait for.
        return await asyncio.shield(self._pending)

    async def _reload(self) -> T:
        started = self._clock()
        try:
            value = await self._load()
        finally:
            self._pending = None
        took = self._clock() - started
        self._value, self._loaded_at = value, self._clock()
        self._ttl = max(self.min_interval, took * self.cost_factor)
        self.version += 1
        return value


class ConsoleData:
    """The dashboard's reads through one ``Queue``."""

    def __init__(
        self,
        queue: Queue,
        *,
        refresh_seconds: float,
        secrets: Iterable[str] = (),
        schedules: Schedules | None = None,
    ) -> None:
        self.queue = queue
        self.secrets = tuple(secrets)
        self.schedules_source = schedules
        self.overview = Cached(self._overview, min_interval=refresh_seconds)
        self.refresh_seconds = refresh_seconds
        #: Other shared reads (job lists by filter, workers, breakers), least recent first.
        self._reads: OrderedDict[tuple[Any, ...], Cached[Any]] = OrderedDict()
        self.hour = Cached(self._hour, min_interval=max(1.0, refresh_seconds))
        self.day = Cached(self._day, min_interval=max(30.0, refresh_seconds))

    async def _overview(self) -> dict[str, Any]:
        q = self.queue
        counts = await q.overview()
        paused = set(await q.paused())
        hour = await self.hour.get()
        workers = await q.workers()
        alerts = await q.alert_states()
        by_queue: dict[str, dict[str, Any]] = {}
        for name in sorted({row["queue"] for row in counts} | paused):
            by_queue[name] = {
                "queue": name,
                "counts": dict.fromkeys(STATUSES, 0),
                "ready": 0,
                "scheduled": 0,
                "oldest_ready_seconds": None,
                "paused": name in paused,
                "workers": 0,
                "concurrency": 0,
                "succeeded_1h": 0,
                "failed_1h": 0,
                "p50_seconds": None,
                "p95_seconds": None,
            }
        for row in counts:
            item = by_queue[row["queue"]]
            item["counts"] = {s: int(row[s]) for s in STATUSES}
            item["ready"], item["scheduled"] = int(row["ready"]), int(row["scheduled"])
            oldest = float(row["oldest_ready_seconds"])
            item["oldest_ready_seconds"] = round(oldest, 3) if item["ready"] else None
        for worker in workers:
            for name in worker["queues"]:
                if worker["alive"] and name in by_queue:
                    by_queue[name]["workers"] += 1
                    by_queue[name]["concurrency"] += int(worker["concurrency"])
        buckets: dict[str, list[list[int]]] = {}
        for row in hour:
            entry = by_queue.get(row["queue"])
            if entry is None:
                continue
            entry["succeeded_1h"] += int(row["succeeded"])
            entry["failed_1h"] += int(row["failed"])
            buckets.setdefault(row["queue"], []).append(row["buckets"])
        for name, rows in buckets.items():
            merged = merge_buckets(rows)
            by_queue[name]["p50_seconds"] = _round(percentile(merged, 0.5))
            by_queue[name]["p95_seconds"] = _round(percentile(merged, 0.95))
        queues = list(by_queue.values())
        totals = dict.fromkeys(STATUSES, 0)
        for item in queues:
            for status, n in item["counts"].items():
                totals[status] += n
        return {
            "generated_at": datetime.now(UTC).isoformat(),
            "queues": queues,
            "totals": totals,
            "workers_alive": sum(1 for w in workers if w["alive"]),
            "workers_gone": sum(1 for w in workers if not w["alive"]),
            "alerts_firing": [
                {
                    "alert": a["alert"],
                    "queue": a["subject"],
                    "value": a["value"],
                    "threshold": a["threshold"],
                }
                for a in alerts
                if a["status"] in ("firing", "resolving")
            ],
        }

    def _shared(self, key: tuple[Any, ...], load: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """``load()``, shared by every request asking for ``key`` within the refresh
        interval (so 20 browsers on one page cost one query per interval)."""
        entry = self._reads.get(key)
        if entry is None:
            entry = self._reads[key] = Cached(load, min_interval=self.refresh_seconds)
            while len(self._reads) > 256:
                self._reads.popitem(last=False)
        else:
            self._reads.move_to_end(key)
        result: Awaitable[T] = entry.get()
        return result

    def invalidate(self) -> None:
        """After an action: every read loads again."""
        self.overview.invalidate()
        self._reads.clear()

    def list_jobs(self, **filters: Any) -> Awaitable[list[dict[str, Any]]]:
        """``Queue.list_jobs`` rows, last errors redacted, shared per filter set."""

        async def load() -> list[dict[str, Any]]:
            return [self.row(r) for r in await self.queue.list_jobs(**filters)]

        return self._shared(("jobs", *sorted(filters.items())), load)

    def workers(self) -> Awaitable[list[dict[str, Any]]]:
        return self._shared(("workers",), self.queue.workers)

    def breakers(self) -> Awaitable[list[dict[str, Any]]]:
        return self._shared(("breakers",), self.queue.fleet_breakers)

    async def _hour(self) -> list[dict[str, Any]]:
        return await self.queue.history(60)

    async def _day(self) -> list[dict[str, Any]]:
        return await self.queue.history(24 * 60)

    async def history(self, queue: str | None, minutes: int) -> list[dict[str, Any]]:
        """Job-level history rows of the last ``minutes`` (at most a day), from the
        shared hour or day cache."""
        rows = await (self.hour if minutes <= 60 else self.day).get()
        cutoff = _minute_floor(datetime.now(UTC)) - timedelta(minutes=minutes - 1)
        return [r for r in rows if r["minute"] >= cutoff and (queue is None or r["queue"] == queue)]

    def job(self, job: Job) -> dict[str, Any]:
        """A job for the detail page and ``/api/jobs/{id}``, secrets redacted."""
        errors = [self.error(e) for e in job.errors if isinstance(e, dict)]
        return {
            "id": job.id,
            "queue": job.queue,
            "kind": getattr(job, "kind", "default"),
            "status": job.status.value,
            "stage": job.stage,
            "attempt": job.attempt,
            "max_attempts": job.max_attempts,
            "deferrals": job.deferrals,
            "priority": job.priority,
            "run_at": job.run_at,
            "correlation_id": job.correlation_id,
            "created_at": job.created_at,
            "updated_at": job.updated_at,
            "finished_at": job.finished_at,
            "lease_owner": job.lease_owner,
            "lease_expires_at": job.lease_expires_at,
            "dedupe_key": None if job.dedupe_key is None else redact_text(job.dedupe_key),
            "payload": redact_value(job.payload, secrets=self.secrets),
            "state": redact_value(job.state, secrets=self.secrets),
            "errors": errors,
            "last_error": errors[-1] if errors else None,
        }

    def error(self, record: dict[str, Any]) -> dict[str, Any]:
        clean: dict[str, Any] = redact_value(record, secrets=self.secrets)
        return clean

    def row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A ``Queue.list_jobs`` row, its last error redacted."""
        out = dict(row)
        if isinstance(out.get("last_error"), dict):
            out["last_error"] = self.error(out["last_error"])
        return out

    async def schedules(self) -> list[dict[str, Any]]:
        if self.schedules_source is None:
            return []
        rows = await self.schedules_source()
        return [redact_value(dict(r), secrets=self.secrets) for r in rows]


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def timeline(job: dict[str, Any]) -> list[tuple[Any, str]]:
    """``(time, what)`` events of a job, oldest first: created, each failed attempt,
    the checkpoint, the end."""
    events: list[tuple[Any, str]] = [(job["created_at"], "created")]
    for error in job["errors"]:
        where = f" in stage {error.get('stage')!s}" if error.get("stage") else ""
        events.append(
            (
                _when(error.get("at")),
                f"attempt {error.get('attempt', '?')} failed{where}: "
                f"{error.get('type', '?')} ({error.get('kind', '?')})",
            )
        )
    if job["stage"]:
        events.append((job["updated_at"], f"checkpoint after stage {job['stage']}"))
    if job["finished_at"] is not None:
        events.append((job["finished_at"], job["status"]))
    elif job["status"] == "cancelled":
        events.append((job["updated_at"], "cancelled"))
    return events


def _when(value: Any) -> datetime | None:
    """An error record's ``at`` (ISO text) as a datetime, None when unreadable."""
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _minute_floor(value: datetime) -> datetime:
    return value.replace(second=0, microsecond=0)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def series(
    rows: Sequence[dict[str, Any]], *, minutes: int, step: int, fields: Sequence[str]
) -> tuple[list[datetime], dict[str, list[float]]]:
    """History rows summed into ``minutes // step`` buckets of ``step`` minutes each,
    ending with the current minute: the x axis and one list per field."""
    end = _minute_floor(datetime.now(UTC))
    n = max(1, minutes // step)
    start = end - timedelta(minutes=n * step - 1)
    xs = [start + timedelta(minutes=i * step) for i in range(n)]
    out = {f: [0.0] * n for f in fields}
    for row in rows:
        index = int((row["minute"] - start).total_seconds() // 60) // step
        if 0 <= index < n:
            for f in fields:
                out[f][index] += float(row[f])
    return xs, out
