"""Helpers for testing workers built on worker_core (also used by its own tests).

``run_stages(stages, payload)`` runs a stage list in process without a database
and returns the final state (``arun_stages`` from async code). ``running(worker)``
runs a worker in the background for the duration of a block and stops it
gracefully; ``wait_for_status`` waits until a job reaches a status.
Waiting across processes has no event to wait on, so these poll the database at a
short interval with a hard deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from ._inline import arun_stages, run_stages
from .jobs import Job, JobStatus
from .queue import Queue
from .worker import BaseWorker

__all__ = ["arun_stages", "run_stages", "running", "wait_for", "wait_for_status"]


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> None:
    """Wait until ``predicate()`` (a plain or an async function) is true;
    ``TimeoutError`` naming ``what`` if not."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if await result if inspect.isawaitable(result) else result:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(interval)


async def wait_for_status(
    queue: Queue, job_id: int, *statuses: JobStatus, timeout: float = 10.0
) -> Job:
    """Wait until job ``job_id`` has one of ``statuses``; returns it."""
    found: list[Job] = []

    async def reached() -> bool:
        job = await queue.get(job_id)
        if job is not None and job.status in statuses:
            found.append(job)
            return True
        return False

    await wait_for(reached, timeout=timeout, what=f"job {job_id} in {[s.value for s in statuses]}")
    return found[-1]


@asynccontextmanager
async def running(worker: BaseWorker, **run_kwargs: Any) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``worker`` in a background task for the block; stop it gracefully after.

    Raises whatever ``run()`` raised, so a worker that failed to start fails the test.
    """
    run_kwargs.setdefault("install_signal_handlers", False)
    task = asyncio.create_task(worker.run(**run_kwargs))
    # Let run() begin, so a stop() from the block, however early, reaches this run.
    await asyncio.sleep(0)
    try:
        yield task
    finally:
        if not task.done():
            await worker.stop()
        await task
