"""A worker process calling a fleet-wide rate-limited service, for the fleet test:
``python limit_proc.py``.

Reads WC_DSN, WC_SCHEMA, WC_RATE and WC_BURST. Prints ``READY`` once its four jobs
are in their stage, then reads ``GO <start> <end>`` (wall-clock times) on stdin, so
that every process of the test starts calling at once however long it took to
start. Each job then takes a token of the fleet-wide limit ``api`` and records a
call, again and again until ``end``. Prints ``CALLS <calls in [start, end)> <lease
round trips> <tokens leased>`` once the worker has stopped.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from worker_core import BaseWorker, StageContext, WorkerConfig
from worker_core.fleetlimit import FleetBucket

CONCURRENCY = 4
CALLS: list[float] = []
WINDOW: list[float] = []
ENTERED: list[int] = []


class CallApi:
    name = "call_api"

    def __init__(self, go: asyncio.Event) -> None:
        self.go = go

    async def run(self, ctx: StageContext) -> None:
        limiter = ctx.rate_limiter("api")
        assert isinstance(limiter, FleetBucket) and limiter.active
        ENTERED.append(ctx.job.id)
        if len(ENTERED) == CONCURRENCY:
            print("READY", flush=True)
        await self.go.wait()
        start, end = WINDOW
        await asyncio.sleep(max(0.0, start - time.time()))
        while time.time() < end:
            await limiter.acquire()
            CALLS.append(time.time())


class ApiWorker(BaseWorker):
    go: asyncio.Event

    def stages(self) -> list[Any]:
        return [CallApi(self.go)]


async def wait_for_go(go: asyncio.Event) -> None:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    _, start, end = line.split()
    WINDOW[:] = [float(start), float(end)]
    go.set()


async def main() -> None:
    config = WorkerConfig(
        environment="test",
        database={"dsn": os.environ["WC_DSN"], "schema": os.environ["WC_SCHEMA"]},
        queue={
            "name": "api",
            "concurrency": CONCURRENCY,
            "poll_interval": 0.2,
            "lease_seconds": 60,
            "heartbeat_seconds": 5,
        },
        rate_limits={
            "api": {
                "rate": float(os.environ["WC_RATE"]),
                "burst": int(os.environ["WC_BURST"]),
                "fleet_wide": True,
            }
        },
    )
    worker = ApiWorker(config)
    worker.go = asyncio.Event()
    reader = asyncio.create_task(wait_for_go(worker.go))
    await worker.run(until_empty=True)
    await reader
    limiter = worker.rate_limiter("api")
    assert isinstance(limiter, FleetBucket)
    start, end = WINDOW
    calls = sum(1 for t in CALLS if start <= t < end)
    print("CALLS", calls, limiter.leases, limiter.leased, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
