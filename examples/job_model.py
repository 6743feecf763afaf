"""Job kinds, several queues, waiting for a result, cancelling a running job, pausing.

One worker serves two queues ("uploads" first, then "backfill") and knows two
kinds of job, each with its own pipeline; the stage that fetches is shared. A
producer waits for a job's result, cancels a job while it runs (its stage sees
asyncio.CancelledError), and pauses a queue for a moment.

    python examples/job_model.py      # an embedded PostgreSQL unless WORKER_CORE_DATABASE__DSN
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from worker_core import BaseWorker, Job, Queue, StageContext, WorkerConfig

#: Set when the slow job's stage has started (so the example cancels a running job).
SLOW_STARTED = asyncio.Event()


class Fetch:
    name = "fetch"

    async def run(self, ctx: StageContext) -> None:
        if ctx.job.payload.get("slow"):
            SLOW_STARTED.set()
            await asyncio.sleep(60)  # a cancel stops it here
        ctx.state["text"] = f"contents of {ctx.job.payload['key']}"


class Index:
    name = "index"

    async def run(self, ctx: StageContext) -> None:
        ctx.state["words"] = len(ctx.state["text"].split())


class Thumbnail:
    name = "thumbnail"

    async def run(self, ctx: StageContext) -> None:
        ctx.state["thumbnail"] = ctx.job.payload["key"] + ".png"


class MediaWorker(BaseWorker):
    def pipelines(self) -> dict[str, list[Any]]:
        fetch = Fetch()  # kinds may share stage objects
        return {"document": [fetch, Index()], "image": [fetch, Thumbnail()]}

    async def on_cancelled(self, job: Job) -> None:
        print(f"job {job.id}: cancelled while running (stage done: {job.stage})")


async def main(dsn: str) -> None:
    config = WorkerConfig(
        database={"dsn": dsn, "schema": "example_job_model"},
        queue={"name": ["uploads", "backfill"], "queue_concurrency": {"backfill": 2}},
    )
    async with Queue(config) as queue:
        await queue.migrate()
        worker = MediaWorker(config)
        task = asyncio.create_task(worker.run())

        doc = await queue.enqueue({"key": "report.txt"}, kind="document")  # to "uploads"
        image = await queue.enqueue({"key": "cat.jpg"}, kind="image", queue="backfill")
        for job_id in (doc, image):
            job = await queue.wait(job_id, timeout=10)
            print(f"job {job.id} ({job.kind} on {job.queue}): {job.status.value}, {job.state}")

        slow = await queue.enqueue({"key": "huge.txt", "slow": True}, kind="document")
        await SLOW_STARTED.wait()
        await queue.cancel(slow)  # running: its worker stops the run at once
        print(f"job {slow}: {(await queue.wait(slow, timeout=10)).status.value}")

        await queue.pause("backfill")  # persistent and fleet-wide; enqueue still works
        later = await queue.enqueue({"key": "dog.jpg"}, kind="image", queue="backfill")
        await asyncio.sleep(0.5)
        print(f"job {later} while paused: {(await queue.get(later)).status.value}")  # type: ignore[union-attr]
        await queue.resume("backfill")
        print(f"job {later} after resume: {(await queue.wait(later, timeout=10)).status.value}")

        await worker.stop()
        await task


if __name__ == "__main__":
    dsn = os.environ.get("WORKER_CORE_DATABASE__DSN")
    if dsn:
        asyncio.run(main(dsn))
    else:
        from worker_core.embedded import EmbeddedPostgres

        with EmbeddedPostgres() as server:
            asyncio.run(main(server.dsn))
