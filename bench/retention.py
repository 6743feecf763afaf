"""Drain rate after a million jobs with retention on, against a fresh table.

1. Fresh: three times, a new schema, N no-op jobs enqueued and drained by one
   BaseWorker (``run(until_empty=True)``) with the same settings as step 2,
   retention included; the median is the baseline.
2. Aged: one schema, retention on (finished jobs pruned after ``--retention``
   seconds by the worker's own maintenance task, every ``--interval`` seconds;
   the jobs table vacuumed by the worker past ``maintenance.vacuum_dead_rows``).
   One long-running worker takes ``--total`` jobs, enqueued in rounds of
   ``--round``; each round's rate (enqueue to last job done) is printed with the
   table's size and whether a VACUUM ran meanwhile. Then the worker stops and the
   same N-job probe as in step 1 runs three times on the aged table.

Targets (issue 7): the aged probe's median within 10 % of the fresh median; no
round during which a VACUUM ran slower than 80 % of the median round.

    python bench/retention.py [--total 1000000] [--round 50000] [--probe 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from _common import database, drop_schema, new_schema, run, server_version, summary
from psycopg import AsyncConnection
from throughput import NoopWorker

from worker_core import BaseWorker, Queue, StageContext, WorkerConfig


def make_config(dsn: str, schema: str, args: argparse.Namespace) -> WorkerConfig:
    """The same settings for the fresh and the aged table: only the history differs."""
    return WorkerConfig(
        database={"dsn": dsn, "schema": schema},
        queue={"name": "bench", "concurrency": args.concurrency, "prefetch": args.prefetch},
        maintenance={"retention_seconds": args.retention, "interval": args.interval},
    )


async def drain(config: WorkerConfig, queue: Queue, jobs: int) -> float:
    """Enqueue ``jobs`` no-op jobs, then time one worker draining them."""
    await queue.enqueue_many([{"i": i} for i in range(jobs)])
    worker = NoopWorker(config)
    started = time.perf_counter()
    await worker.run(until_empty=True, install_signal_handlers=False)
    elapsed = time.perf_counter() - started
    assert worker.metrics.processed == jobs, worker.metrics.summary()
    return jobs / elapsed


async def table_state(dsn: str, schema: str) -> dict[str, int]:
    async with await AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT coalesce(vacuum_count, 0), coalesce(autovacuum_count, 0), "
            "coalesce(autoanalyze_count, 0), "
            "n_live_tup, n_dead_tup, pg_total_relation_size(relid) "
            "FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'jobs'",
            (schema,),
        )
        row = await cur.fetchone()
    assert row is not None
    keys = ("vacuum", "autovacuum", "autoanalyze", "live", "dead", "bytes")
    return dict(zip(keys, (int(v) for v in row), strict=True))


async def fresh(dsn: str, args: argparse.Namespace) -> list[float]:
    rates = []
    for _ in range(args.repeat):
        schema = new_schema("fresh")
        config = make_config(dsn, schema, args)
        try:
            async with Queue(config) as queue:
                await queue.migrate()
                rates.append(await drain(config, queue, args.probe))
        finally:
            drop_schema(dsn, schema)
    return rates


class Counting:
    """A no-op stage that wakes the bench when ``target`` jobs have run."""

    name = "noop"

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.reached = asyncio.Event()

    async def run(self, ctx: StageContext) -> None:
        self.count += 1
        if self.count >= self.target:
            self.reached.set()


class LongRunningWorker(BaseWorker):
    stage: Counting

    def stages(self) -> list[Any]:
        return [self.stage]


async def aged(dsn: str, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """One long-running worker (as in production: its maintenance and vacuum tasks
    run on their own schedule) takes ``--total`` jobs enqueued in rounds."""
    schema = new_schema("aged")
    config = make_config(dsn, schema, args)
    rounds: list[tuple[float, bool]] = []
    try:
        async with Queue(config) as queue:
            await queue.migrate()
            worker = LongRunningWorker(config)
            worker.stage = counter = Counting()
            running = asyncio.create_task(worker.run(install_signal_handlers=False))
            processed = 0
            started = time.perf_counter()
            while processed < args.total:
                size = min(args.round, args.total - processed)
                before = await table_state(dsn, schema)
                counter.target = processed + size
                counter.reached.clear()
                round_started = time.perf_counter()
                await queue.enqueue_many([{"i": i} for i in range(size)])
                await counter.reached.wait()
                rate = size / (time.perf_counter() - round_started)
                after = await table_state(dsn, schema)
                vacuumed = after["vacuum"] > before["vacuum"] or (
                    after["autovacuum"] > before["autovacuum"]
                )
                rounds.append((rate, vacuumed))
                processed += size
                print(
                    f"  round {len(rounds):>3}: {processed:>9,} processed, {rate:>7,.0f} jobs/s"
                    f"{' (vacuum ran)' if vacuumed else ''}; jobs table "
                    f"{after['live']:,} live / {after['dead']:,} dead rows, "
                    f"{after['bytes'] / 2**20:,.1f} MiB",
                    flush=True,
                )
            elapsed = time.perf_counter() - started
            await worker.stop()
            await running
            state = await table_state(dsn, schema)
            print(
                f"{processed:,} jobs in {elapsed:,.1f} s (enqueue included); jobs table now "
                f"{state['live']:,} live rows, {state['bytes'] / 2**20:,.1f} MiB; the worker "
                f"vacuumed it {worker.metrics.vacuums} times and pruned "
                f"{worker.metrics.pruned:,} jobs; autovacuum ran {state['autovacuum']} times"
            )
            probes = [await drain(config, queue, args.probe) for _ in range(args.repeat)]
    finally:
        drop_schema(dsn, schema)
    round_rates = [rate for rate, _ in rounds]
    typical = statistics.median(round_rates)
    print(f"rounds: {summary(round_rates)} jobs/s")
    vacuum_rates = [rate for rate, vacuumed in rounds if vacuumed]
    return probes, [rate / typical for rate in vacuum_rates] or [1.0]


async def main(args: argparse.Namespace) -> None:
    with database() as dsn:
        print(
            f"PostgreSQL {server_version(dsn)}; concurrency {args.concurrency}, prefetch "
            f"{args.prefetch}; probe {args.probe:,} jobs x {args.repeat}; retention "
            f"{args.retention:g} s every {args.interval:g} s"
        )
        baseline = await fresh(dsn, args)
        print(f"fresh table: {summary(baseline)} jobs/s")
        probes, vacuum_ratios = await aged(dsn, args)
        print(f"after {args.total:,} jobs with retention: {summary(probes)} jobs/s")
        ratio = statistics.median(probes) / statistics.median(baseline)
        print(
            f"aged / fresh drain rate: {ratio:.2f} (target >= 0.90) "
            f"{'OK' if ratio >= 0.9 else 'MISSED'}"
        )
        worst = min(vacuum_ratios)
        print(
            f"slowest round with a VACUUM running: {worst:.2f} of the median round "
            f"(target >= 0.80) {'OK' if worst >= 0.8 else 'MISSED'}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total", type=int, default=1_000_000)
    parser.add_argument("--round", type=int, default=50_000)
    parser.add_argument("--probe", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--prefetch", type=int, default=50)
    parser.add_argument("--retention", type=float, default=1.0)
    parser.add_argument("--interval", type=float, default=0.5)
    run(main(parser.parse_args()))
