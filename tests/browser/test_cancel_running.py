"""A running job cancelled from the page ends cancelled.

DESIGN section 3: ``running --cancel--> cancelled``; the page's Cancel button asks
``Queue.cancel`` and the owning worker stops the run at its next await.
"""

from __future__ import annotations

import asyncio
from typing import Any

from selenium.webdriver.common.by import By

from worker_core import JobStatus
from worker_core.testing import wait_for_status

from .conftest import Served


def test_a_running_job_cancelled_from_the_page_ends_cancelled(page: Any, serve: Any) -> None:
    served: Served = serve()
    job_id = served.run(served.queue.enqueue({"key": "long", "wait": True}))
    worker = served.worker()

    async def start() -> asyncio.Task[None]:
        return asyncio.create_task(worker.run(install_signal_handlers=False))

    task = served.run(start())
    try:
        served.run(wait_for_status(served.queue, job_id, JobStatus.RUNNING, timeout=20))
        page.get(served.url(f"/jobs/{job_id}"))
        page.find_element(By.XPATH, "//button[text()='Cancel']").click()
        ended = served.run(
            wait_for_status(
                served.queue, job_id, JobStatus.CANCELLED, JobStatus.SUCCEEDED, timeout=10
            )
        )
        assert ended.status is JobStatus.CANCELLED
    finally:
        served.loop.loop.call_soon_threadsafe(served.hold.set)
        served.run(worker.stop())
        served.run(asyncio.wait_for(_finished(task), 30))


async def _finished(task: asyncio.Task[None]) -> None:
    await task
