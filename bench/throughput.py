"""Drain throughput and wake-up latency of one worker process.

1. Enqueue N no-op jobs and drain them with one BaseWorker; in the same run, the
   raw SQL ceiling on the same database: a loop that claims 100 jobs with SKIP
   LOCKED and marks those 100 done, no library. Target: worker >= 30 % of raw.
2. Enqueue-to-stage-start latency of single jobs on an idle worker (LISTEN/NOTIFY
   wake-up, polling set to 1 s). Target: p50 < 5 ms.

    python bench/throughput.py [--jobs 20000] [--repeat 3] [--concurrency 10 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from _common import database, drop_schema, new_schema, run, server_version, summary
from psycopg import AsyncConnection, sql

from worker_core import BaseWorker, Queue, StageContext, WorkerConfig
from worker_core.testing import wait_for


class Noop:
    name = "noop"

    async def run(self, ctx: StageContext) -> None:
        return None


class NoopWorker(BaseWorker):
    def stages(self) -> list[Any]:
        return [Noop()]


def make_config(dsn: str, schema: str, concurrency: int, **queue: Any) -> WorkerConfig:
    return WorkerConfig.model_validate(
        {
            "database": {"dsn": dsn, "schema": schema},
            "queue": {"name": "bench", "concurrency": concurrency, **queue},
        }
    )


async def fill(config: WorkerConfig, jobs: int) -> None:
    async with Queue(config) as queue:
        await queue.migrate()
        await queue.enqueue_many([{"i": i} for i in range(jobs)])


async def drain_worker(dsn: str, jobs: int, concurrency: int) -> float:
    schema = new_schema()
    config = make_config(dsn, schema, concurrency)
    try:
        await fill(config, jobs)
        worker = NoopWorker(config)
        started = time.perf_counter()
        await worker.run(until_empty=True, install_signal_handlers=False)
        elapsed = time.perf_counter() - started
        assert worker.metrics.processed == jobs, worker.metrics.summary()
        return jobs / elapsed
    finally:
        drop_schema(dsn, schema)


async def drain_raw(dsn: str, jobs: int) -> float:
    schema = new_schema()
    config = make_config(dsn, schema, 1)
    try:
        await fill(config, jobs)
        ident = sql.Identifier(schema)
        claim = sql.SQL(
            "WITH picked AS MATERIALIZED (SELECT id FROM {}.jobs WHERE queue = 'bench' "
            "AND status = 'queued' AND run_at <= now() ORDER BY priority DESC, run_at, id "
            "LIMIT 100 FOR NO KEY UPDATE SKIP LOCKED) "
            "UPDATE {}.jobs AS j SET status = 'running', attempt = j.attempt + 1, "
            "lease_owner = 'raw', lease_expires_at = now() + interval '30 seconds' "
            "FROM picked WHERE j.id = picked.id RETURNING j.id"
        ).format(ident, ident)
        done = sql.SQL(
            "UPDATE {}.jobs SET status = 'succeeded', lease_owner = NULL, lease_expires_at = NULL, "
            "finished_at = now() WHERE id = ANY(%s)"
        ).format(ident)
        processed = 0
        async with await AsyncConnection.connect(dsn, autocommit=True) as conn:
            started = time.perf_counter()
            while True:
                cur = await conn.execute(claim)
                ids = [r[0] for r in await cur.fetchall()]
                if not ids:
                    break
                await conn.execute(done, (ids,))
                processed += len(ids)
            elapsed = time.perf_counter() - started
        assert processed == jobs
        return jobs / elapsed
    finally:
        drop_schema(dsn, schema)


class Timestamp:
    name = "stamp"

    def __init__(self, seen: dict[int, float], arrived: asyncio.Event) -> None:
        self.seen = seen
        self.arrived = arrived

    async def run(self, ctx: StageContext) -> None:
        self.seen[ctx.job.id] = time.perf_counter()
        self.arrived.set()


class LatencyWorker(BaseWorker):
    stage: Timestamp

    def stages(self) -> list[Any]:
        return [self.stage]


async def ready(worker: BaseWorker) -> bool:
    snapshot = worker.snapshot()
    return snapshot.listener_connected and snapshot.last_claim_at is not None


async def latency(dsn: str, samples: int) -> list[float]:
    schema = new_schema()
    config = make_config(dsn, schema, 10, poll_interval=1.0)
    seen: dict[int, float] = {}
    arrived = asyncio.Event()
    try:
        async with Queue(config) as queue:
            await queue.migrate()
            worker = LatencyWorker(config)
            worker.stage = Timestamp(seen, arrived)
            task = asyncio.create_task(worker.run(install_signal_handlers=False))
            await wait_for(lambda: ready(worker), what="worker idle and listening")
            out = []
            for i in range(samples + 10):
                arrived.clear()
                started = time.perf_counter()
                job_id = await queue.enqueue({"i": i})
                await asyncio.wait_for(arrived.wait(), 5)
                if i >= 10:  # warm-up: prepared statements, pool connections
                    out.append((seen[job_id] - started) * 1000)
                await asyncio.sleep(0.005)  # let the worker go idle again
            await worker.stop()
            await task
        return out
    finally:
        drop_schema(dsn, schema)


async def main(jobs: int, repeat: int, concurrencies: list[int], samples: int) -> None:
    with database() as dsn:
        print(f"PostgreSQL {server_version(dsn)}; {jobs:,} no-op jobs, {repeat} runs each")
        raw: list[float] = []
        lib: dict[int, list[float]] = {c: [] for c in concurrencies}
        for _ in range(repeat):
            raw.append(await drain_raw(dsn, jobs))
            for c in concurrencies:
                lib[c].append(await drain_worker(dsn, jobs, c))
        ceiling = statistics.median(raw)
        print(f"raw SQL ceiling (claim 100 / mark 100 done loop): {summary(raw)} jobs/s")
        for c in concurrencies:
            ratio = statistics.median(lib[c]) / ceiling
            verdict = "OK" if ratio >= 0.30 else "MISSED"
            print(
                f"worker_core, concurrency {c:>3}: {summary(lib[c])} jobs/s; "
                f"{ratio:.0%} of raw (target >= 30%) {verdict}"
            )
        lat = await latency(dsn, samples)
        p50 = statistics.median(lat)
        p99 = statistics.quantiles(lat, n=100)[98]
        print(
            f"enqueue-to-stage-start on an idle worker ({len(lat)} jobs): p50 {p50:.2f} ms, "
            f"p99 {p99:.2f} ms, max {max(lat):.2f} ms (target p50 < 5 ms) "
            f"{'OK' if p50 < 5 else 'MISSED'}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    run(main(args.jobs, args.repeat, args.concurrency, args.samples))
