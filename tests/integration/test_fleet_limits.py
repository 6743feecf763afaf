"""Fleet-wide rate limits on a real PostgreSQL: workers in separate processes stay
within the rate together, at a fraction of a round trip per token."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from worker_core import BaseWorker, Queue, StageContext, WorkerConfig
from worker_core.errors import RetryableError
from worker_core.fleet import TokenLeaseStore
from worker_core.fleetlimit import FleetBucket

HERE = Path(__file__).parent


@pytest.mark.timeout(180)
def test_two_worker_processes_share_twenty_calls_a_second(pg_dsn: str, schema: str) -> None:
    config = WorkerConfig(
        environment="test", database={"dsn": pg_dsn, "schema": schema}, queue={"name": "api"}
    )

    async def setup() -> None:
        async with Queue(config) as queue:
            await queue.migrate()
            await queue.enqueue_many([{"caller": i} for i in range(8)])

    asyncio.run(setup())
    env = {**os.environ, "WC_DSN": pg_dsn, "WC_SCHEMA": schema, "WC_RATE": "20", "WC_BURST": "5"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "limit_proc.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    for proc in procs:  # both hold four jobs and wait for the word
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
    start = time.time() + 0.5
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(f"GO {start} {start + 10.0}\n")
        proc.stdin.flush()
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    rows = [out.split()[-3:] for out, _ in outputs]
    calls = sum(int(r[0]) for r in rows)
    leases = sum(int(r[1]) for r in rows)
    # At most burst + rate * seconds = 205 calls in the 10 s, and close to it.
    assert 190 <= calls <= 210, rows
    assert all(int(r[0]) > 0 for r in rows)  # both workers called
    assert leases / calls < 0.5, rows


async def open_queues(config: WorkerConfig, n: int) -> list[Queue]:
    queues = [Queue(config) for _ in range(n)]
    for queue in queues:
        await queue.open()
    await queues[0].migrate()
    return queues


async def test_buckets_of_two_pools_share_one_row(config: WorkerConfig) -> None:
    queues = await open_queues(config, 2)
    try:
        stores = [TokenLeaseStore(q) for q in queues]
        buckets = [FleetBucket(200.0, 10, name="api") for _ in queues]
        for bucket, store in zip(buckets, stores, strict=True):
            bucket.attach(store)
        calls: list[float] = []
        start = time.monotonic()
        stop = start + 2.0

        async def caller(bucket: FleetBucket) -> None:
            while time.monotonic() < stop:
                await bucket.acquire()
                calls.append(time.monotonic())

        await asyncio.gather(*(caller(b) for b in buckets for _ in range(4)))
        in_window = [c for c in calls if c < stop]
        assert len(in_window) <= 10 + 200 * 2 + 2
        assert len(in_window) >= 0.85 * (10 + 200 * 2)
        trips = sum(s.round_trips for s in stores)
        assert trips / len(calls) < 0.25
        async with queues[0].connection() as conn:
            cur = await conn.execute(
                sql.SQL("SELECT name, rate, burst FROM {}.rate_limits").format(
                    sql.Identifier(queues[0].schema)
                )
            )
            assert await cur.fetchall() == [("api", 200.0, 10)]
        for bucket in buckets:
            await bucket.detach()
    finally:
        for queue in queues:
            await queue.close()


async def test_a_lost_database_defers_instead_of_waiting(config: WorkerConfig) -> None:
    (queue,) = await open_queues(config, 1)
    bucket = FleetBucket(5.0, 1, name="api", retry_interval=3.0)
    bucket.attach(TokenLeaseStore(queue, timeout=1.0))
    assert await bucket.acquire() == pytest.approx(0.0, abs=0.5)
    await queue.close()  # every later lease fails
    started = time.monotonic()
    error: RetryableError | None = None
    for _ in range(5):  # any token leased ahead is used first
        try:
            await bucket.acquire()
        except RetryableError as exc:
            error = exc
            break
    assert error is not None
    assert str(error).startswith("fleet rate limit 'api': cannot lease tokens (")
    assert time.monotonic() - started < 3.0
    with pytest.raises(RetryableError) as caught:
        await bucket.acquire()
    assert 0 < (caught.value.retry_after or 0) <= 3.0


class Probe:
    name = "probe"

    async def run(self, ctx: StageContext) -> None:
        limiter = ctx.rate_limiter("api")
        ctx.state["fleet"] = isinstance(limiter, FleetBucket) and limiter.active
        assert limiter is not None
        ctx.state["waited"] = await limiter.acquire()


class ProbeWorker(BaseWorker):
    def stages(self) -> list[Any]:
        return [Probe()]


async def test_a_worker_shares_its_fleet_wide_limits_while_it_runs(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    config = make_config(rate_limits={"api": {"rate": 50, "burst": 2, "fleet_wide": True}})
    job_ids = await queue.enqueue_many([{} for _ in range(3)])
    worker = ProbeWorker(config)
    await worker.run(until_empty=True, install_signal_handlers=False)
    jobs: list[Any] = [await queue.get(i) for i in job_ids]
    assert [j.state["fleet"] for j in jobs] == [True, True, True]
    limiter = worker.rate_limiter("api")
    assert isinstance(limiter, FleetBucket) and not limiter.active  # detached at stop
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL(
                "SELECT least(burst, tokens + rate * extract(epoch FROM clock_timestamp() "
                "- updated_at))::float8 FROM {}.rate_limits WHERE name = 'api'"
            ).format(sql.Identifier(queue.schema))
        )
        row = await cur.fetchone()
    # No debt is left behind: reservations still in the future were given back.
    assert row is not None
    assert row[0] >= -1e-6
