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

Targets (issues 7 and 17): the aged probe's median within 10 % of the fresh
median; no round during which a VACUUM ran slower than 80 % of the median round.

Variants (issue 17), each measured fresh and aged with its own settings, only
settings and SQL of this script:

- ``default``: the worker's defaults (``maintenance.vacuum_dead_rows`` 100,000, the
  claim index rebuilt by the workers once 4 times what its entries need);
- ``noreindex``: defaults but for the library's own rebuild of the claim index
  (``maintenance.reindex_claim_index_factor = None``), to measure what it brings;
- ``vdr=N``: ``maintenance.vacuum_dead_rows = N`` (the setting's floor is 1,000);
- ``reindex=S``: defaults, plus this script running ``REINDEX INDEX CONCURRENTLY``
  of the claim index (``jobs_claim_idx``) every S seconds while the worker runs
  (fresh probes and aged rounds alike), timed;
- ``reindex-all=S``: the same for every partial index the hot path churns
  (claim, running-lease, finished).

    python bench/retention.py [--total 1000000] [--round 50000] [--probe 20000]
    python bench/retention.py --variants default vdr=20000 reindex=5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import _servers
from _common import drop_schema, new_schema, run, server_version, summary
from psycopg import AsyncConnection, sql
from throughput import NoopWorker

from worker_core import BaseWorker, Queue, StageContext, WorkerConfig


@dataclass
class Variant:
    name: str
    vacuum_dead_rows: int | None = None  # None: the library's default
    reindex_every: float | None = None
    reindex_indexes: tuple[str, ...] = ("jobs_claim_idx",)
    reindex_seconds: list[float] = field(default_factory=list)
    #: False: maintenance.reindex_claim_index_factor = None (the library's rebuild off)
    library_reindex: bool = True

    @classmethod
    def parse(cls, text: str) -> Variant:
        if text == "default":
            return cls(text)
        if text == "noreindex":  # the library's own rebuild of the claim index off
            return cls(text, library_reindex=False)
        key, _, value = text.partition("=")
        if key == "vdr":
            return cls(text, vacuum_dead_rows=int(value))
        if key == "reindex":
            return cls(text, reindex_every=float(value))
        if key == "reindex-all":
            every = float(value)
            return cls(
                text, None, every, ("jobs_claim_idx", "jobs_running_lease_idx", "jobs_finished_idx")
            )
        raise argparse.ArgumentTypeError(f"unknown variant {text!r}")


def make_config(
    dsn: str, schema: str, args: argparse.Namespace, variant: Variant | None = None
) -> WorkerConfig:
    """The same settings for the fresh and the aged table: only the history differs."""
    maintenance: dict[str, Any] = {"retention_seconds": args.retention, "interval": args.interval}
    if variant is not None and variant.vacuum_dead_rows is not None:
        maintenance["vacuum_dead_rows"] = variant.vacuum_dead_rows
    if variant is not None and not variant.library_reindex:
        maintenance["reindex_claim_index_factor"] = None
    return WorkerConfig.model_validate(
        {
            "database": {"dsn": dsn, "schema": schema},
            "queue": {
                "name": "bench",
                "concurrency": args.concurrency,
                "prefetch": args.prefetch,
            },
            "maintenance": maintenance,
        }
    )


@contextlib.asynccontextmanager
async def reindexing(dsn: str, schema: str, variant: Variant | None) -> AsyncIterator[None]:
    """While the body runs: REINDEX INDEX CONCURRENTLY the variant's indexes every
    ``reindex_every`` seconds (nothing for other variants). CONCURRENTLY takes no
    lock that blocks claims or writes; it and VACUUM exclude each other, and the
    worker's VACUUM uses SKIP_LOCKED, so a collision skips that vacuum."""
    if variant is None or variant.reindex_every is None:
        yield
        return
    every = variant.reindex_every

    async def loop() -> None:
        async with await AsyncConnection.connect(dsn, autocommit=True) as conn:
            while True:
                await asyncio.sleep(every)
                for index in variant.reindex_indexes:
                    started = time.perf_counter()
                    await conn.execute(
                        sql.SQL("REINDEX INDEX CONCURRENTLY {}.{}").format(
                            sql.Identifier(schema), sql.Identifier(index)
                        )
                    )
                    variant.reindex_seconds.append(time.perf_counter() - started)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def drain(
    config: WorkerConfig, queue: Queue, jobs: int, variant: Variant | None = None
) -> float:
    """Enqueue ``jobs`` no-op jobs, then time one worker draining them."""
    await queue.enqueue_many([{"i": i} for i in range(jobs)])
    worker = NoopWorker(config)
    dsn = config.database.dsn.get_secret_value() if config.database.dsn else ""
    async with reindexing(dsn, config.database.schema, variant):
        server_before = SERVER_CPU.seconds() if SERVER_CPU else None
        cpu = time.process_time()
        started = time.perf_counter()
        await worker.run(until_empty=True, install_signal_handlers=False)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        server_after = SERVER_CPU.seconds() if SERVER_CPU else None
    assert worker.metrics.processed == jobs, worker.metrics.summary()
    if server_before is not None and server_after is not None:
        # Client (this process: the worker runs here) plus server CPU per job: less
        # sensitive than the rate to other work on a shared machine.
        CPU_PER_JOB.setdefault(id(queue), []).append((cpu + server_after - server_before) / jobs)
    return jobs / elapsed


# CPU seconds per job (client + server) of each probe, by the Queue it ran on.
CPU_PER_JOB: dict[int, list[float]] = {}
SERVER_CPU: _servers.ServerCpu | None = None


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


async def index_sizes(dsn: str, schema: str) -> str:
    """The jobs table's heap and index sizes, to see what aged."""
    async with await AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND (c.relname = 'jobs' OR c.oid IN "
            "(SELECT indexrelid FROM pg_index WHERE indrelid = %s::regclass)) "
            "ORDER BY c.relname",
            (schema, f'"{schema}".jobs'),
        )
        rows = await cur.fetchall()
    return ", ".join(f"{name} {size / 2**20:,.1f}" for name, size in rows) + " (MiB)"


async def fresh(
    dsn: str, args: argparse.Namespace, variant: Variant | None = None
) -> tuple[list[float], list[float]]:
    rates = []
    cpu: list[float] = []
    for i in range(args.repeat):
        schema = new_schema("fresh")
        config = make_config(dsn, schema, args, variant)
        try:
            async with Queue(config) as queue:
                await queue.migrate()
                rates.append(await drain(config, queue, args.probe, variant))
                cpu.extend(CPU_PER_JOB.pop(id(queue), []))
                if i == args.repeat - 1:
                    print(f"  fresh table after a probe: {await index_sizes(dsn, schema)}")
        finally:
            drop_schema(dsn, schema)
    return rates, cpu


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


async def aged(
    dsn: str, args: argparse.Namespace, variant: Variant | None = None
) -> tuple[list[float], list[float], list[float]]:
    """One long-running worker (as in production: its maintenance and vacuum tasks
    run on their own schedule) takes ``--total`` jobs enqueued in rounds."""
    schema = new_schema("aged")
    config = make_config(dsn, schema, args, variant)
    rounds: list[tuple[float, bool]] = []
    try:
        async with Queue(config) as queue:
            await queue.migrate()
            worker = LongRunningWorker(config)
            worker.stage = counter = Counting()
            running = asyncio.create_task(worker.run(install_signal_handlers=False))
            reindex = reindexing(dsn, schema, variant)
            await reindex.__aenter__()
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
                if not args.verbose and len(rounds) % 5 and processed < args.total:
                    continue
                print(
                    f"  round {len(rounds):>3}: {processed:>9,} processed, {rate:>7,.0f} jobs/s"
                    f"{' (vacuum ran)' if vacuumed else ''}; jobs table "
                    f"{after['live']:,} live / {after['dead']:,} dead rows, "
                    f"{after['bytes'] / 2**20:,.1f} MiB",
                    flush=True,
                )
            elapsed = time.perf_counter() - started
            await reindex.__aexit__(None, None, None)
            await worker.stop()
            await running
            state = await table_state(dsn, schema)
            print(
                f"{processed:,} jobs in {elapsed:,.1f} s (enqueue included); jobs table now "
                f"{state['live']:,} live rows, {state['bytes'] / 2**20:,.1f} MiB; the worker "
                f"vacuumed it {worker.metrics.vacuums} times and pruned "
                f"{worker.metrics.pruned:,} jobs; autovacuum ran {state['autovacuum']} times"
            )
            print(f"  aged table: {await index_sizes(dsn, schema)}")
            probes = [await drain(config, queue, args.probe, variant) for _ in range(args.repeat)]
            probe_cpu = CPU_PER_JOB.pop(id(queue), [])
    finally:
        drop_schema(dsn, schema)
    round_rates = [rate for rate, _ in rounds]
    typical = statistics.median(round_rates)
    print(f"rounds: {summary(round_rates)} jobs/s")
    vacuum_rates = [rate for rate, vacuumed in rounds if vacuumed]
    return probes, [rate / typical for rate in vacuum_rates] or [1.0], probe_cpu


async def one_variant(
    dsn: str, args: argparse.Namespace, variant: Variant
) -> tuple[float, float, float]:
    print(f"\n== variant {variant.name} ==", flush=True)
    baseline, fresh_cpu = await fresh(dsn, args, variant)
    print(f"fresh table: {summary(baseline)} jobs/s")
    probes, vacuum_ratios, aged_cpu = await aged(dsn, args, variant)
    print(f"after {args.total:,} jobs with retention: {summary(probes)} jobs/s")
    ratio = statistics.median(probes) / statistics.median(baseline)
    print(
        f"aged / fresh drain rate: {ratio:.2f} (target >= 0.90) "
        f"{'OK' if ratio >= 0.9 else 'MISSED'}"
    )
    cpu_ratio = float("nan")
    if fresh_cpu and aged_cpu:
        f_us, a_us = statistics.median(fresh_cpu) * 1e6, statistics.median(aged_cpu) * 1e6
        cpu_ratio = f_us / a_us
        print(
            f"CPU per job (worker + server): fresh {f_us:,.0f} us, aged {a_us:,.0f} us; "
            f"fresh / aged {cpu_ratio:.2f} (the rate ratio's CPU-bound counterpart)"
        )
    worst = min(vacuum_ratios)
    print(
        f"slowest round with a VACUUM running: {worst:.2f} of the median round "
        f"(target >= 0.80) {'OK' if worst >= 0.8 else 'MISSED'}"
    )
    if variant.reindex_seconds:
        times = variant.reindex_seconds
        print(
            f"REINDEX CONCURRENTLY: {len(times)} runs, median {statistics.median(times) * 1000:,.0f} ms"
            f", max {max(times) * 1000:,.0f} ms"
        )
    return ratio, statistics.median(probes), cpu_ratio


async def main(args: argparse.Namespace) -> None:
    global SERVER_CPU
    with _servers.from_args(args) as server:
        dsn = server.dsn
        SERVER_CPU = _servers.ServerCpu(server.postmaster_pid) if server.postmaster_pid else None
        print(
            f"PostgreSQL {server_version(dsn)} ({server.description}); concurrency "
            f"{args.concurrency}, prefetch {args.prefetch}; probe {args.probe:,} jobs x "
            f"{args.repeat}; retention {args.retention:g} s every {args.interval:g} s"
        )
        outcome = {}
        for variant in args.variants:
            outcome[variant.name] = await one_variant(dsn, args, variant)
        if len(outcome) > 1:
            print("\nvariant        aged/fresh rate  fresh/aged CPU per job  aged probe jobs/s")
            for name, (ratio, rate, cpu_ratio) in outcome.items():
                print(f"{name:<14} {ratio:>15.2f}  {cpu_ratio:>22.2f}  {rate:>17,.0f}")


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
    parser.add_argument(
        "--variants",
        nargs="+",
        type=Variant.parse,
        default=[Variant("default")],
        help="default | noreindex | vdr=N | reindex=SECONDS | reindex-all=SECONDS "
        "(each fresh and aged)",
    )
    parser.add_argument("--verbose", action="store_true", help="print every round")
    _servers.add_arguments(parser)
    run(main(parser.parse_args()))
