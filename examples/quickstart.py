"""Quick start: the word-count worker of the README, end to end.

Uses ``WORKER_CORE_DATABASE__DSN`` when set; otherwise starts an embedded
PostgreSQL (the ``embedded`` extra) in a temporary directory and removes it after.

    python examples/quickstart.py
"""

from __future__ import annotations

import asyncio
import os

from worker_core import BaseWorker, PermanentError, Queue, StageContext, WorkerConfig


class Parse:
    name = "parse"

    async def run(self, ctx: StageContext) -> None:
        text = ctx.job.payload.get("text")
        if not text:
            raise PermanentError("empty document")
        ctx.state["words"] = text.split()


class Count:
    name = "count"

    async def run(self, ctx: StageContext) -> None:
        ctx.state["n"] = len(ctx.state["words"])
        ctx.logger.info("counted", n=ctx.state["n"])


class WordCountWorker(BaseWorker):
    def stages(self) -> list[Parse | Count]:
        return [Parse(), Count()]


async def main(dsn: str) -> None:
    config = WorkerConfig(database={"dsn": dsn, "schema": "quickstart"}, queue={"name": "docs"})
    async with Queue(config) as queue:
        await queue.migrate()
        ok = await queue.enqueue({"text": "hello world"})
        bad = await queue.enqueue({"text": ""})
    worker = WordCountWorker(config)
    await worker.run(until_empty=True)
    async with Queue(config) as queue:
        job = await queue.get(ok)
        dead = await queue.get(bad)
        assert job is not None
        assert dead is not None
        print(f"job {job.id}: {job.status.value}, {job.state['n']} words")
        reason = dead.last_error["message"] if dead.last_error else "?"
        print(f"job {dead.id}: {dead.status.value} ({reason})")
        print("queue stats:", await queue.stats("docs"))
    print("metrics:", worker.metrics.summary())


if __name__ == "__main__":
    dsn = os.environ.get("WORKER_CORE_DATABASE__DSN")
    if dsn:
        asyncio.run(main(dsn))
    else:
        from worker_core.embedded import EmbeddedPostgres

        with EmbeddedPostgres() as server:
            asyncio.run(main(server.dsn))
