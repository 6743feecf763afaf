"""A worker process for crash and signal tests: ``python proc_worker.py MODE``.

Reads WC_DSN and WC_SCHEMA (and optional WC_LEASE, WC_SLEEP) from the
environment and prints ``STARTED <job_id> <stage>`` when a stage begins, so the
test can act (SIGKILL, SIGTERM) at a known point.
"""

from __future__ import annotations

import asyncio
import os
import sys

from worker_core import BaseWorker, StageContext, WorkerConfig


def say(*parts: object) -> None:
    print(*parts, flush=True)


class First:
    name = "first"

    async def run(self, ctx: StageContext) -> None:
        say("STARTED", ctx.job.id, self.name)
        ctx.state["first_by"] = os.getpid()


class Block:
    name = "second"

    async def run(self, ctx: StageContext) -> None:
        say("STARTED", ctx.job.id, self.name)
        await asyncio.Event().wait()  # until killed


class Sleep:
    name = "second"

    async def run(self, ctx: StageContext) -> None:
        say("STARTED", ctx.job.id, self.name)
        await asyncio.sleep(float(os.environ.get("WC_SLEEP", "0.5")))
        ctx.state["slept"] = True


class ProcWorker(BaseWorker):
    mode = "block"

    def stages(self) -> list[object]:  # type: ignore[override]
        return [First(), Block() if self.mode == "block" else Sleep()]


async def main(mode: str) -> None:
    lease = float(os.environ.get("WC_LEASE", "2"))
    config = WorkerConfig(
        environment="test",
        database={"dsn": os.environ["WC_DSN"], "schema": os.environ["WC_SCHEMA"]},
        queue={
            "name": "test",
            "concurrency": int(os.environ.get("WC_CONCURRENCY", "4")),
            "lease_seconds": lease,
            "heartbeat_seconds": lease / 4,
            "poll_interval": 0.2,
            "shutdown_timeout": float(os.environ.get("WC_SHUTDOWN", "10")),
            "flush_interval": 0.01,
        },
    )
    worker = ProcWorker(config)
    worker.mode = mode
    say("READY", worker.worker_id)
    await worker.run()
    say("EXITED", worker.metrics.summary()["processed"])


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
