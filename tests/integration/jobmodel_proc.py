"""A worker process for the job-model tests: ``python jobmodel_proc.py MODE``.

Reads WC_DSN and WC_SCHEMA (and WC_MAX_RUNNING, WC_CONCURRENCY) from the
environment.

- ``capped``: serves queue "capped" with ``queue.max_running``; each job's stage
  counts itself in the row of ``{schema}.probe`` while it holds for 0.15 s and
  records the highest count seen (how many ran at once across every process);
  runs until the queue is empty, then prints ``DONE <jobs processed>``.
"""

from __future__ import annotations

import asyncio
import os
import sys

from psycopg import sql

from worker_core import BaseWorker, StageContext, WorkerConfig


class Probe:
    name = "probe"

    async def run(self, ctx: StageContext) -> None:
        probe = sql.SQL("{}.probe").format(sql.Identifier(ctx.worker.config.database.schema))
        async with ctx.connection() as conn:
            await conn.execute(
                sql.SQL("UPDATE {} SET n = n + 1, peak = greatest(peak, n + 1)").format(probe)
            )
        try:
            await asyncio.sleep(0.15)
        finally:
            async with ctx.connection() as conn:
                await conn.execute(sql.SQL("UPDATE {} SET n = n - 1").format(probe))


class CappedWorker(BaseWorker):
    def stages(self) -> list[object]:  # type: ignore[override]
        return [Probe()]


async def main(mode: str) -> None:
    assert mode == "capped", mode
    config = WorkerConfig(
        environment="test",
        database={"dsn": os.environ["WC_DSN"], "schema": os.environ["WC_SCHEMA"]},
        queue={
            "name": "capped",
            "concurrency": int(os.environ.get("WC_CONCURRENCY", "4")),
            "max_running": int(os.environ["WC_MAX_RUNNING"]),
            "poll_interval": 0.1,
            "flush_interval": 0.0,
        },
    )
    worker = CappedWorker(config)
    await worker.run(until_empty=True, install_signal_handlers=False)
    print("DONE", worker.metrics.summary()["processed"], flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
