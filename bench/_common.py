"""Shared set-up for the benchmark scripts: a database, a fresh schema, an aged table.

Uses ``WORKER_CORE_BENCH_DSN`` when set; otherwise starts an embedded PostgreSQL
with default settings (durable commits, as in production) in a temporary directory.
"""

from __future__ import annotations

import os
import statistics
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql


@contextmanager
def database() -> Iterator[str]:
    dsn = os.environ.get("WORKER_CORE_BENCH_DSN")
    if dsn:
        yield dsn
        return
    from worker_core.embedded import EmbeddedPostgres

    with EmbeddedPostgres(settings={"max_connections": 200}) as server:
        yield server.dsn


def new_schema(prefix: str = "bench") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def drop_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def server_version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):,.0f} (range {min(values):,.0f}-{max(values):,.0f})"


def run(coro: Any) -> Any:
    """Run ``coro`` on uvloop when installed (as `worker-core run` does), else asyncio."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    print(f"event loop: {'uvloop' if factory else 'asyncio'}")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


async def finished_jobs(queue: Any, n: int) -> None:
    """``n`` jobs enqueued and marked succeeded in ``queue``'s table, then VACUUM
    ANALYZE: the backlog of finished rows of a table that has been in use."""
    await queue.enqueue_many([{"i": i} for i in range(n)])
    async with queue.connection() as conn:
        table = sql.Identifier(queue.schema, "jobs")
        await conn.execute(
            sql.SQL("UPDATE {} SET status = 'succeeded', finished_at = now()").format(table)
        )
        await conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table))


def cpu_sum(spent: float | None, before: float | None, after: float | None) -> float | None:
    """``spent`` plus one interval's CPU (``after - before``); None once any is unknown."""
    if spent is None or before is None or after is None:
        return None
    return spent + after - before
