"""The operations console's side of ``Queue``: pause and resume, the per-minute
history, the workers registry, alert states and leases, and the dashboard's reads.

A mixin of ``Queue`` (kept apart so the producer and worker protocol stay readable);
its statements come from ``sql/console.sql``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

from . import _inputs
from .jobs import JobStatus
from .sql import load_queries, render

__all__ = ["ConsoleMethods"]


class ConsoleMethods:
    """Console methods of ``Queue``; see that class."""

    schema: str
    channel: str
    control_channel: str

    if TYPE_CHECKING:  # provided by Queue

        def connection(
            self, connection: AsyncConnection[Any] | None = None
        ) -> AbstractAsyncContextManager[AsyncConnection[Any]]: ...

        def _queue_name(self, queue: str | None) -> str: ...

    @functools.cached_property
    def _console(self) -> dict[str, bytes]:
        return {
            name: render(text, self.schema, kind=_KIND).as_bytes(None)
            for name, text in load_queries("console.sql").items()
        }

    async def _rows(self, name: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        async with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(self._console[name], params)
            return await cur.fetchall()

    async def _count(self, name: str, params: Mapping[str, Any]) -> int:
        async with self.connection() as conn:
            cur = await conn.execute(self._console[name], params)
            return cur.rowcount

    async def pause(self, queue: str | None = None, *, by: str | None = None) -> bool:
        """Stop every worker claiming ``queue``'s jobs (running jobs finish); persistent.

        Returns False when it was paused already. Listeners get a NOTIFY.
        """
        params = {"queue": self._queue_name(queue), "by": by, "control": self.control_channel}
        return bool(await self._rows("pause", params))

    async def resume(self, queue: str | None = None) -> bool:
        """Let workers claim ``queue`` again and wake them; False when it was not paused."""
        params = {
            "queue": self._queue_name(queue),
            "channel": self.channel,
            "control": self.control_channel,
        }
        return bool(await self._rows("resume", params))

    async def paused(self) -> list[str]:
        """The paused queues of this schema, sorted."""
        return [row["queue"] for row in await self._rows("paused", {})]

    async def history(
        self, minutes: int = 60, queue: str | None = None, *, stages: bool = False
    ) -> list[dict[str, Any]]:
        """Per-minute rollups of the last ``minutes`` minutes, oldest first.

        Each row: ``minute``, ``queue``, ``kind``, ``succeeded``, ``failed``,
        ``retried``, ``deferred``, ``dead_lettered``, ``seconds_sum``, ``buckets``
        (duration counts per ``worker_core.history.BOUNDS``) and ``stage`` (None on
        job-level rows; with ``stages=True`` the per-stage rows come too).
        """
        minutes = _inputs.int_param(minutes, "minutes", minimum=1)
        if minutes > 366 * 24 * 60:
            raise ValueError(f"minutes={minutes} is more than a year")
        name = None if queue is None else self._queue_name(queue)
        return await self._rows(
            "history", {"minutes": minutes, "queue": name, "stages": bool(stages)}
        )

    async def record_history(self, rows: Sequence[Sequence[Any]]) -> None:
        """Add rollup rows ``(minute epoch, queue, kind, stage, succeeded, failed,
        retried, deferred, dead_lettered, seconds_sum, buckets)`` in one statement."""
        if rows:
            ordered = sorted(rows, key=lambda r: (r[0], r[1], r[2], r[3]))
            text = json.dumps(ordered, allow_nan=False, separators=(",", ":"))
            await self._count("record_history", {"rows": text})

    async def prune_history(self, retention_days: float, *, limit: int = 10_000) -> int:
        """Delete up to ``limit`` history rows older than ``retention_days``."""
        return await self._count("prune_history", {"days": retention_days, "limit": limit})

    async def register_worker(self, worker: Mapping[str, Any]) -> None:
        """Upsert a workers-registry row (id, host, pid, version, queues, kinds,
        concurrency, in_flight, lease); its ``last_seen`` becomes now."""
        await self._count("register_worker", worker)

    async def leave_worker(self, worker_id: str) -> None:
        """Remove a worker from the registry (graceful stop)."""
        await self._count("leave_worker", {"id": worker_id})

    async def prune_workers(self) -> int:
        """Forget workers gone for more than a day."""
        return await self._count("prune_workers", {})

    async def workers(self) -> list[dict[str, Any]]:
        """The workers registry, live ones first; ``alive`` is False once a worker
        missed its lease (it died or hangs)."""
        return await self._rows("workers", {})

    async def take_lease(self, name: str, owner: str, ttl: float) -> tuple[bool, float]:
        """Take or renew lease ``name`` for ``ttl`` seconds; returns (held, database
        clock as epoch seconds)."""
        if not math.isfinite(ttl) or ttl <= 0:
            raise ValueError(f"lease ttl must be a positive number of seconds, got {ttl!r}")
        rows = await self._rows("take_lease", {"name": name, "owner": owner, "ttl": ttl})
        return rows[0]["owner"] == owner, float(rows[0]["now"])

    async def release_lease(self, name: str, owner: str) -> None:
        await self._count("release_lease", {"name": name, "owner": owner})

    async def alert_states(self) -> list[dict[str, Any]]:
        """Every alert's stored state (alert, subject, status, since, value, threshold,
        notified)."""
        return await self._rows("alert_states", {})

    async def save_alert_states(
        self, owner: str, rows: Sequence[Sequence[Any]], *, lease: str = "alerts"
    ) -> bool:
        """Upsert alert states, only while ``owner`` holds ``lease``; False otherwise."""
        if not rows:
            return True
        text = json.dumps(list(rows), allow_nan=False, separators=(",", ":"))
        params = {"owner": owner, "lease": lease, "rows": text}
        return bool(await self._rows("save_alert_states", params))

    async def prune_alerts(self) -> int:
        return await self._count("prune_alerts", {})

    async def alert_values(
        self, alert: str, *, window: float = 300.0, min_count: int = 1
    ) -> list[tuple[str, float]]:
        """``(subject, value)`` of alert rule ``alert`` now (see sql/console.sql)."""
        if alert not in _ALERT_QUERIES:
            raise ValueError(f"unknown alert rule {alert!r}")
        rows = await self._rows(
            f"alert_{alert}", {"window": float(window), "min_count": int(min_count)}
        )
        return [(row["subject"], float(row["value"])) for row in rows]

    async def firing_alerts(self) -> list[tuple[str, str, float]]:
        """``(alert, subject, 1.0 firing or 0.0)`` for every known alert."""
        rows = await self._rows("firing_alerts", {})
        return [(row["alert"], row["subject"], float(row["firing"])) for row in rows]

    async def discard(self, job_ids: int | Sequence[int]) -> int:
        """Move dead jobs to cancelled (an operator gave up on them); returns how many."""
        ids = (
            [_inputs.job_id(job_ids)]
            if isinstance(job_ids, int)
            else [_inputs.job_id(i) for i in job_ids]
        )
        return len(await self._rows("discard", {"ids": ids})) if ids else 0

    async def overview(self) -> list[dict[str, Any]]:
        """Per queue: a count per status, ready and scheduled, the oldest ready age."""
        return await self._rows("overview", {})

    async def list_jobs(
        self,
        *,
        queue: str | None = None,
        kind: str | None = None,
        status: JobStatus | str | None = None,
        stage: str | None = None,
        search: str | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Jobs newest first, ``limit`` at most, with ids below ``before`` (keyset paging).

        ``search``: a job id, a correlation id, a payload key, or ``key=value`` (the
        key's text value). Payload, state and errors are left out (see ``get``).
        """
        for label, text in (("kind", kind), ("stage", stage), ("search", search)):
            if text is not None and ("\x00" in text or len(text) > 1000):
                raise ValueError(f"{label} must be at most 1000 characters without NUL")
        value: str | None = None
        if search is not None and "=" in search:
            search, value = (part.strip() for part in search.split("=", 1))
        search_id = int(search) if search and search.isascii() and search.isdigit() else None
        params = {
            "queue": None if queue is None else self._queue_name(queue),
            "kind": kind,
            "status": None if status is None else JobStatus(status).value,
            "stage": stage,
            "search": search or None,
            "search_value": value,
            "search_id": search_id if search_id is not None and search_id < 2**63 else None,
            "before": before,
            "limit": _inputs.int_param(limit, "limit", minimum=1),
        }
        return await self._rows("list_jobs", params)

    async def fleet_breakers(self) -> list[dict[str, Any]]:
        """The shared circuit breakers: state (closed, open, half_open), failures,
        opened_at, seconds until a probe (``half_open_in``), seconds open."""
        return await self._rows("fleet_breakers", {})


#: The jobs' kind in console queries (the column of migration 0008).
_KIND: sql.Composable = sql.Identifier("kind")
_ALERT_QUERIES = frozenset(
    {
        "dead_letters",
        "oldest_ready_seconds",
        "breaker_open_seconds",
        "no_workers_seconds",
        "failure_ratio",
    }
)
