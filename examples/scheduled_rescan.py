"""A scheduled re-scan: every hour, one worker of the fleet lists a bucket and
enqueues an ingestion job for each object.

``RescanWorker.schedules()`` returns one ``Schedule``; every running worker
evaluates it, and exactly one job of kind ``rescan`` is enqueued per hour however
many workers run. The re-scan job lists the objects (a local folder stands in for
the bucket) and enqueues one ``document`` job per object on the ``ingest`` queue,
with the object's version in the dedupe key: an object whose job is still waiting
is not enqueued twice, and a changed object gets a new job. Unchanged objects cost
a no-op job downstream (``DocumentWorker`` writes nothing for a version it has).

The demonstration fires every second instead of every hour (the cron has a
seconds field), and stops after three re-scans, changing one file before the last.

Uses ``WORKER_CORE_DATABASE__DSN`` when set; otherwise starts an embedded
PostgreSQL (the ``embedded`` extra) in a temporary directory and removes it after.

    python examples/scheduled_rescan.py
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

from worker_core import BaseWorker, Job, Queue, Schedule, StageContext, WorkerConfig


def list_objects(root: Path) -> list[tuple[str, str]]:
    """(key, version) of every object under ``root``; blocking, so run in a thread."""
    found = sorted(p for p in root.rglob("*") if p.is_file())
    return [(str(p.relative_to(root)), f"{p.stat().st_size}-{p.stat().st_mtime_ns}") for p in found]


class Rescan:
    name = "rescan"

    async def run(self, ctx: StageContext) -> None:
        objects = await asyncio.to_thread(list_objects, Path(ctx.job.payload["root"]))
        documents = [{"document_id": key, "key": key} for key, _ in objects]
        versions = [f"{key}@{version}" for key, version in objects]
        # On a connection of the worker's pool, given to enqueue_many (a Queue needs no
        # pool of its own then).
        async with ctx.connection() as conn:
            ids = await Queue(ctx.worker.config).enqueue_many(
                documents, queue="ingest", kind="document", dedupe_keys=versions, connection=conn
            )
        ctx.state["objects"] = len(ids)


class RescanWorker(BaseWorker):
    #: Every hour, on the hour, in the bucket owners' time zone.
    cron = "0 * * * *"

    def __init__(self, config: WorkerConfig, root: Path) -> None:
        super().__init__(config)
        self.root = root
        self.scans: asyncio.Queue[Job] = asyncio.Queue()

    def stages(self) -> list[Any]:
        return [Rescan()]

    def schedules(self) -> list[Schedule]:
        return [
            Schedule(
                "rescan-docs",
                self.cron,
                {"root": str(self.root)},
                kind="rescan",
                timezone="Europe/Paris",
            )
        ]

    async def on_job_done(self, job: Job) -> None:
        await self.scans.put(job)


async def main(dsn: str) -> None:
    config = WorkerConfig(
        database={"dsn": dsn, "schema": "example_rescan"}, queue={"name": "rescans"}
    )
    async with Queue(config) as queue:
        await queue.migrate()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for name in ("a.md", "b.md", "c.md"):
            (root / name).write_text(f"# {name}\n")
        worker = RescanWorker(config, root)
        worker.cron = "* * * * * *"  # the demonstration: every second
        running = asyncio.create_task(worker.run())
        async with Queue(config) as queue:

            async def next_scan(label: str) -> int:
                job = await asyncio.wait_for(worker.scans.get(), 30)
                waiting = (await queue.stats("ingest"))["queued"]
                print(f"{label}: {job.state['objects']} objects, {waiting} ingest jobs waiting")
                return waiting

            await next_scan("first re-scan")
            await next_scan("next re-scan")  # the same versions: nothing new
            (root / "b.md").write_text("# b.md, edited\n")
            while await next_scan("re-scan after editing b.md") < 4:
                pass  # a scan that listed the folder before the edit
        await worker.stop()
        await running


if __name__ == "__main__":
    dsn = os.environ.get("WORKER_CORE_DATABASE__DSN")
    if dsn:
        asyncio.run(main(dsn))
    else:
        from worker_core.embedded import EmbeddedPostgres

        with EmbeddedPostgres() as server:
            asyncio.run(main(server.dsn))
