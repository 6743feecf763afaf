"""What a fleet-wide rate limit costs: database round trips and added latency per token.

Four processes share one limit of 200 calls/s (``rate_limits.api.fleet_wide``),
in three runs of ``--seconds`` each:

- saturated: eight callers per process take tokens as fast as the limit lets them;
  reports the calls made against what the limit allows, the lease round trips per
  token and the round trip's own duration;
- paced, fleet-wide: each process calls at evenly spaced times, ``--load`` of its
  share together (0.9: 180 calls/s; at exactly the limit any hiccup leaves a
  backlog that never drains, and the latency measures that backlog instead of the
  limiter); reports how long ``acquire`` took, from the call's due time;
- paced, per process: the same load against a per-process ``TokenBucket`` of 50/s,
  the limit each process would need without a fleet-wide one. The difference of
  the two latencies is what sharing the limit through the database adds.

    python bench/limits.py [--seconds 10] [--processes 4] [--rate 200] [--load 0.9]

Uses ``WORKER_CORE_BENCH_DSN`` or an embedded PostgreSQL (see bench/_common.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from _common import database, drop_schema, new_schema, server_version

from worker_core import Queue, WorkerConfig
from worker_core.fleet import TokenLeaseStore
from worker_core.fleetlimit import FleetBucket
from worker_core.ratelimit import TokenBucket

BURST = 20


class TimedStore(TokenLeaseStore):
    """A lease store that records how long each round trip took."""

    def __init__(self, db: Queue) -> None:
        super().__init__(db)
        self.durations: list[float] = []

    async def lease(self, name: str, *, rate: float, burst: int, want: int) -> float:
        started = time.perf_counter()
        try:
            return await super().lease(name, rate=rate, burst=burst, want=want)
        finally:
            self.durations.append(time.perf_counter() - started)


async def child(mode: str, dsn: str, schema: str, rate: float, share: float, load: float) -> None:
    """One process of a run: prints READY, reads ``GO start end``, prints its JSON result."""
    config = WorkerConfig(database={"dsn": dsn, "schema": schema, "pool_max_size": 4})
    async with Queue(config) as queue:
        store = TimedStore(queue)
        if mode == "local":
            limiter: FleetBucket | TokenBucket = TokenBucket(share, max(1, BURST // 4), name="api")
        else:
            limiter = FleetBucket(rate, BURST, name="api")
            limiter.attach(store)
        print("READY", flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        _, start_text, end_text = line.split()
        start, end = float(start_text), float(end_text)
        await asyncio.sleep(max(0.0, start - time.time()))
        calls: list[float] = []
        latencies: list[float] = []

        async def hammer() -> None:
            while time.time() < end:
                await limiter.acquire()
                calls.append(time.time())

        async def paced_call(due: float) -> None:
            await asyncio.sleep(max(0.0, due - time.time()))
            await limiter.acquire()
            now = time.time()
            calls.append(now)
            latencies.append(max(0.0, now - due))

        if mode == "saturated":
            await asyncio.gather(*(hammer() for _ in range(8)))
        else:
            period = 1.0 / (share * load)
            count = int((end - start) / period)
            await asyncio.gather(*(paced_call(start + i * period) for i in range(count)))
        if isinstance(limiter, FleetBucket):
            await limiter.detach()
    result = {
        "calls": sum(1 for t in calls if start <= t < end),
        "round_trips": store.round_trips,
        "lease_ms": [d * 1000 for d in store.durations],
        "latency_ms": [x * 1000 for x in latencies],
    }
    print(json.dumps(result), flush=True)


def run_fleet(mode: str, dsn: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    schema = new_schema("limits")
    asyncio.run(_migrate(dsn, schema))
    share = args.rate / args.processes
    numbers = [str(args.rate), str(share), str(args.load)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", mode, dsn, schema, *numbers],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(args.processes)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError(f"a {mode} process did not start")
        start = time.time() + 0.5
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"GO {start} {start + args.seconds}\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=args.seconds + 120)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        drop_schema(dsn, schema)
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


async def _migrate(dsn: str, schema: str) -> None:
    async with Queue(WorkerConfig(database={"dsn": dsn, "schema": schema})) as queue:
        await queue.migrate()


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--load", type=float, default=0.9, help="paced load / limit")
    args = parser.parse_args()
    with database() as dsn:
        print(
            f"PostgreSQL {server_version(dsn)}; a fleet-wide limit of {args.rate:g} calls/s "
            f"(burst {BURST}) over {args.processes} processes, {args.seconds:g} s per run "
            "(figures provisional on a shared machine)"
        )
        saturated = run_fleet("saturated", dsn, args)
        calls = sum(r["calls"] for r in saturated)
        trips = sum(r["round_trips"] for r in saturated)
        lease = [d for r in saturated for d in r["lease_ms"]]
        allowed = BURST + args.rate * args.seconds
        print(
            f"saturated: {calls:,} calls ({calls / allowed:.1%} of the {allowed:,.0f} the limit "
            f"allows, per process {[r['calls'] for r in saturated]}); {trips} lease round trips "
            f"= {trips / max(calls, 1):.3f} per token; a lease takes median "
            f"{statistics.median(lease):.2f} ms, p99 {pct(lease, 0.99):.2f} ms"
        )
        fleet = run_fleet("paced", dsn, args)
        local = run_fleet("local", dsn, args)
        print(f"paced at {args.load:.0%} of the limit ({args.rate * args.load:g} calls/s):")
        for name, rows in (("  fleet-wide", fleet), ("  per process", local)):
            lat = [x for r in rows for x in r["latency_ms"]]
            calls = sum(r["calls"] for r in rows)
            trips = sum(r["round_trips"] for r in rows)
            print(
                f"{name}: {calls:,} calls; acquire latency median {statistics.median(lat):.2f} ms, "
                f"mean {statistics.mean(lat):.2f} ms, p99 {pct(lat, 0.99):.2f} ms, "
                f"max {max(lat):.2f} ms; {trips / max(calls, 1):.3f} round trips per token"
            )
        f_lat = [x for r in fleet for x in r["latency_ms"]]
        l_lat = [x for r in local for x in r["latency_ms"]]
        print(
            "added by sharing the limit: median "
            f"{statistics.median(f_lat) - statistics.median(l_lat):+.2f} ms, mean "
            f"{statistics.mean(f_lat) - statistics.mean(l_lat):+.2f} ms, p99 "
            f"{pct(f_lat, 0.99) - pct(l_lat, 0.99):+.2f} ms per token"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, dsn, schema, rate, share, load = sys.argv[2:8]
        asyncio.run(child(mode, dsn, schema, float(rate), float(share), float(load)))
    else:
        main()
