"""An outage of an external service under a fleet of workers, with and without
fleet-wide breaker state.

4 worker processes (2 job slots each) drain 200 jobs; each job makes one call to a
local HTTP service (100 ms per call) through the worker's "svc" breaker, which the
workers also declare required (claims pause while it is open). After the first 30
calls the service goes down for 10 s (it answers 500 at once), then comes back.

Scenarios: fleet-wide state with each ``--sync-intervals`` value (how old a
worker's cached read of the shared state may be when it admits a call; 0 reads it
before every call), then local breakers only. Each prints the calls that reached
the dead service, when they came, and the jobs dead-lettered.

Targets: no job dead-lettered; with fleet-wide state, calls during the outage
<= fail_max + one trial per reset period (5 + 10 s / 2 s = 10 with the defaults).

    python bench/outage.py [--jobs 200] [--workers 4] [--outage 10] [--sync-intervals 0.25 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import time
from typing import Any

from aiohttp import web

from worker_core import BaseWorker, Queue, StageContext, WorkerConfig
from worker_core.http import ServiceClient


def make_config(dsn: str, schema: str, args: argparse.Namespace, fleet: bool) -> WorkerConfig:
    return WorkerConfig(
        database={"dsn": dsn, "schema": schema},
        queue={"name": "outage", "concurrency": args.concurrency, "poll_interval": 0.5},
        retry={"base_delay": 0.5, "max_delay": 5.0},
        circuit_breaker={
            "fail_max": args.fail_max,
            "reset_timeout": args.reset_timeout,
            "fleet_wide": fleet,
        },
    )


# -- the worker processes --------------------------------------------------------------
class CallService:
    name = "call"

    def __init__(self, worker: OutageWorker) -> None:
        self.worker = worker

    async def run(self, ctx: StageContext) -> None:
        assert self.worker.client is not None
        await self.worker.client.request("POST", "/work", json={"job": ctx.job.id})


class OutageWorker(BaseWorker):
    required_breakers = ("svc",)

    def __init__(self, config: WorkerConfig, url: str, sync_interval: float | None) -> None:
        super().__init__(config)
        self.url = url
        self.client: ServiceClient | None = None
        # Made before run(), so that run() attaches the registry to the fleet table.
        store = self.breaker("svc").store
        if store is not None and sync_interval is not None:
            store.sync_interval = sync_interval

    def stages(self) -> list[Any]:
        return [CallService(self)]

    async def on_startup(self) -> None:
        self.client = ServiceClient("svc", self.url, breaker=self.breaker("svc"), timeout=5)

    async def on_shutdown(self) -> None:
        if self.client is not None:
            await self.client.close()


async def worker_main(dsn: str, schema: str, url: str, sync: str, args: argparse.Namespace) -> None:
    fleet = sync != "off"
    config = make_config(dsn, schema, args, fleet)
    worker = OutageWorker(config, url, float(sync) if fleet else None)
    print("READY", flush=True)
    await worker.run()  # until the driver's SIGTERM
    print("SUMMARY", json.dumps(worker.metrics.summary()), flush=True)


# -- the service and the driver ------------------------------------------------------
class Service:
    """Up for ``healthy_calls`` calls, then down for ``outage`` seconds, then up."""

    def __init__(self, latency: float, outage: float, healthy_calls: int) -> None:
        self.latency = latency
        self.outage = outage
        self.healthy_calls = healthy_calls
        self.ok = 0
        self.dead_at: list[float] = []
        self.down_from: float | None = None

    def down_for(self) -> float | None:
        """Seconds since the outage began, while it lasts."""
        if self.down_from is None:
            if self.ok < self.healthy_calls:
                return None
            self.down_from = time.monotonic()
        elapsed = time.monotonic() - self.down_from
        return elapsed if elapsed < self.outage else None

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        elapsed = self.down_for()
        if elapsed is not None:
            self.dead_at.append(elapsed)
            return web.Response(status=500, text="down")
        await asyncio.sleep(self.latency)
        self.ok += 1
        return web.json_response({"ok": True})


async def scenario(dsn: str, args: argparse.Namespace, sync: float | None) -> dict[str, Any]:
    from _common import drop_schema, new_schema

    schema = new_schema("outage")
    config = make_config(dsn, schema, args, sync is not None)
    service = Service(args.latency, args.outage, args.healthy_calls)
    app = web.Application()
    app.router.add_post("/work", service.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    procs: list[asyncio.subprocess.Process] = []
    try:
        async with Queue(config) as queue:
            await queue.migrate()
            await queue.enqueue_many([{"n": i} for i in range(args.jobs)])
            for _ in range(args.workers):
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        __file__,
                        "--worker",
                        dsn,
                        schema,
                        f"http://{host}:{port}",
                        "off" if sync is None else str(sync),
                        *sys.argv[1:],
                        stdout=asyncio.subprocess.PIPE,
                    )
                )
            for proc in procs:
                assert proc.stdout is not None
                await proc.stdout.readline()  # READY
            started = time.monotonic()
            while True:
                stats = await queue.stats()
                if stats["succeeded"] + stats["dead"] >= args.jobs:
                    break
                if time.monotonic() - started > args.deadline:
                    print(f"  deadline passed: {stats}", flush=True)
                    break
                await asyncio.sleep(0.2)
            elapsed = time.monotonic() - started
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            summaries = []
            for proc in procs:
                out, _ = await proc.communicate()
                for line in out.decode().splitlines():
                    if line.startswith("SUMMARY "):
                        summaries.append(json.loads(line.split(" ", 1)[1]))
        return {
            "dead_at": service.dead_at,
            "succeeded": stats["succeeded"],
            "dead_jobs": stats["dead"],
            "deferred": sum(s["deferred"] for s in summaries),
            "retried": sum(s["retried"] for s in summaries),
            "seconds": elapsed,
        }
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await runner.cleanup()
        drop_schema(dsn, schema)


async def main(args: argparse.Namespace) -> None:
    from _common import database, server_version

    budget = args.fail_max + math.ceil(args.outage / args.reset_timeout)
    scenarios: list[float | None] = [] if args.local_only else list(args.sync_intervals)
    scenarios.append(None)
    with database() as dsn:
        print(
            f"PostgreSQL {server_version(dsn)}; {args.workers} workers x {args.concurrency} "
            f"slots, {args.jobs} jobs, outage {args.outage:g}s after {args.healthy_calls} "
            f"calls, fail_max {args.fail_max}, reset_timeout {args.reset_timeout:g}s"
        )
        verdicts = []
        for sync in scenarios:
            label = (
                "local breakers only" if sync is None else f"fleet-wide, sync_interval {sync:g}s"
            )
            print(f"{label}:", flush=True)
            result = await scenario(dsn, args, sync)
            calls = len(result["dead_at"])
            print(
                f"  calls that reached the dead service: {calls}; "
                f"jobs dead-lettered: {result['dead_jobs']} (target 0); "
                f"succeeded {result['succeeded']}/{args.jobs}; "
                f"deferrals {result['deferred']}, retries {result['retried']}; "
                f"{result['seconds']:.1f}s",
                flush=True,
            )
            when = " ".join(f"{t:.2f}" for t in result["dead_at"])
            print(f"  seconds into the outage of each of those calls: {when}", flush=True)
            # Calls in the first reset period tripped the circuit (fail_max, plus calls
            # admitted concurrently before the fleet had counted fail_max failures);
            # the later ones are trial calls.
            first = sum(t < args.reset_timeout for t in result["dead_at"])
            periods = math.ceil(args.outage / args.reset_timeout) - 1
            print(
                f"  before the trip: {first} (fail_max {args.fail_max}); trial calls: "
                f"{calls - first} over {periods} reset periods",
                flush=True,
            )
            if sync is not None:
                met = calls <= budget and result["dead_jobs"] == 0
                verdicts.append(f"sync_interval {sync:g}s {'met' if met else 'MISSED'}")
        if verdicts:
            print(
                f"target with fleet-wide state: <= {budget} calls, 0 dead: " + ", ".join(verdicts)
            )


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--outage", type=float, default=10.0)
    parser.add_argument("--healthy-calls", type=int, default=30)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--fail-max", type=int, default=5)
    parser.add_argument("--reset-timeout", type=float, default=2.0)
    parser.add_argument("--sync-intervals", type=float, nargs="*", default=[0.25, 0.0])
    parser.add_argument("--local-only", action="store_true")
    parser.add_argument("--deadline", type=float, default=120.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, dsn, schema, url, sync, *rest = sys.argv
        asyncio.run(worker_main(dsn, schema, url, sync, parse(rest)))
    else:
        from _common import run

        run(main(parse(sys.argv[1:])))
