"""An outage of an external service under a fleet of workers, with and without
fleet-wide breaker state.

4 worker processes drain 200 jobs; each job makes one call to a local HTTP service
(100 ms per call). After the first 30 calls the service goes down for 10 s
(it answers 500 at once), then comes back. For each scenario the script prints the
calls that reached the dead service and the jobs dead-lettered.

Targets: no job dead-lettered; with fleet-wide state, calls during the outage
<= fail_max + one trial per reset period (5 + 10 s / 2 s = 10 with the defaults).

    python bench/outage.py [--jobs 200] [--workers 4] [--outage 10] [--mode both|on|off]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
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
    def __init__(self, config: WorkerConfig, url: str) -> None:
        super().__init__(config)
        self.url = url
        self.client: ServiceClient | None = None
        # Created before run(), so run() attaches the registry to the fleet table.
        self.breaker("svc")

    def stages(self) -> list[Any]:
        return [CallService(self)]

    async def on_startup(self) -> None:
        self.client = ServiceClient("svc", self.url, breaker=self.breaker("svc"), timeout=5)

    async def on_shutdown(self) -> None:
        if self.client is not None:
            await self.client.close()


async def worker_main(
    dsn: str, schema: str, url: str, fleet: bool, args: argparse.Namespace
) -> None:
    worker = OutageWorker(make_config(dsn, schema, args, fleet), url)
    print("READY", flush=True)
    await worker.run()
    print("SUMMARY", json.dumps(worker.metrics.summary()), flush=True)


# -- the service and the driver ------------------------------------------------------
class Service:
    """Up for ``healthy_calls`` calls, then down for ``outage`` seconds, then up."""

    def __init__(self, latency: float, outage: float, healthy_calls: int) -> None:
        self.latency = latency
        self.outage = outage
        self.healthy_calls = healthy_calls
        self.ok = 0
        self.dead = 0
        self.dead_at: list[float] = []
        self.down_from: float | None = None

    def is_down(self) -> bool:
        if self.down_from is None:
            if self.ok < self.healthy_calls:
                return False
            self.down_from = time.monotonic()
            print(f"  service down for {self.outage:g}s after {self.ok} calls", flush=True)
        return time.monotonic() < self.down_from + self.outage

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        if self.is_down():
            assert self.down_from is not None
            self.dead += 1
            self.dead_at.append(time.monotonic() - self.down_from)
            return web.Response(status=500, text="down")
        await asyncio.sleep(self.latency)
        self.ok += 1
        return web.json_response({"ok": True})


async def scenario(dsn: str, args: argparse.Namespace, fleet: bool) -> dict[str, Any]:
    from _common import drop_schema, new_schema

    schema = new_schema("outage")
    config = make_config(dsn, schema, args, fleet)
    service = Service(args.latency, args.outage, args.healthy_calls)
    app = web.Application()
    app.router.add_post("/work", service.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    procs: list[asyncio.subprocess.Process] = []
    try:
        async with Queue(config) as queue:
            await queue.migrate()
            await queue.enqueue_many([{"n": i} for i in range(args.jobs)])
            for _ in range(args.workers):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--worker",
                    dsn,
                    schema,
                    url,
                    "on" if fleet else "off",
                    *sys.argv[1:],
                    stdout=asyncio.subprocess.PIPE,
                )
                procs.append(proc)
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
            "dead_calls": service.dead,
            "dead_at": service.dead_at,
            "ok_calls": service.ok,
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

    with database() as dsn:
        print(
            f"PostgreSQL {server_version(dsn)}; {args.workers} workers x {args.concurrency} "
            f"slots, {args.jobs} jobs, outage {args.outage:g}s, fail_max {args.fail_max}, "
            f"reset_timeout {args.reset_timeout:g}s"
        )
        modes = {"both": [True, False], "on": [True], "off": [False]}[args.mode]
        results = {}
        for fleet in modes:
            label = "fleet-wide on " if fleet else "fleet-wide off"
            print(f"{label}:", flush=True)
            result = await scenario(dsn, args, fleet)
            results[fleet] = result
            print(
                f"  calls that reached the dead service: {result['dead_calls']}; "
                f"jobs dead-lettered: {result['dead_jobs']} (target 0); "
                f"succeeded {result['succeeded']}/{args.jobs}; "
                f"deferrals {result['deferred']}, retries {result['retried']}; "
                f"{result['seconds']:.1f}s",
                flush=True,
            )
            when = " ".join(f"{t:.2f}" for t in result["dead_at"])
            print(f"  seconds into the outage of each of those calls: {when}", flush=True)
        if True in results:
            budget = args.fail_max + math.ceil(args.outage / args.reset_timeout)
            calls = results[True]["dead_calls"]
            verdict = "met" if calls <= budget and results[True]["dead_jobs"] == 0 else "MISSED"
            print(f"target (fleet-wide): dead-service calls <= {budget}, 0 dead jobs: {verdict}")


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
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--mode", choices=["both", "on", "off"], default="both")
    return parser.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, dsn, schema, url, flag, *rest = sys.argv
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        asyncio.run(worker_main(dsn, schema, url, flag == "on", parse(rest)))
    else:
        from _common import run

        run(main(parse(sys.argv[1:])))
