"""The overview under load, as the suite's browser sees it.

Three queues are worked by real workers while the picture is taken; the hour of
history before the run is backfilled (the charts would otherwise show a few
minutes). ``make screenshot`` writes it to docs/console-overview.png (through
WORKER_CORE_SCREENSHOT); the suite writes it to a temporary file and checks it.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from worker_core import BaseWorker, PermanentError, StageContext, TransientError
from worker_core.config import WorkerConfig

from .conftest import Served, counts_in_db, counts_on_page

QUEUES = {"documents": 0.12, "emails": 0.04, "thumbnails": 0.25}
JOBS = {"documents": 600, "emails": 2000, "thumbnails": 400}


class Work:
    """Takes a while; a few inputs are bad (dead letters), some fail once (retries)."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name = name
        self.seconds = seconds

    async def run(self, ctx: StageContext) -> None:
        n = int(ctx.job.payload["n"])
        await asyncio.sleep(self.seconds * (0.5 + (n % 7) / 7))
        if n % 97 == 13 and self.name == "parse":
            raise PermanentError(f"document {n} is not valid UTF-8")
        if n % 11 == 0 and ctx.job.attempt == 1 and self.name == "store":
            raise TransientError("storage timed out")


class LoadWorker(BaseWorker):
    def __init__(self, config: WorkerConfig, seconds: float) -> None:
        super().__init__(config)
        self.seconds = seconds

    def stages(self) -> list[Any]:
        return [Work("parse", self.seconds / 3), Work("store", self.seconds * 2 / 3)]


def _backfill(served: Served) -> Any:
    rng = random.Random(16)
    now = int(time.time() // 60 * 60)
    rows = []
    for queue, seconds in QUEUES.items():
        rate = 40 / seconds
        for m in range(1, 60):
            minute = now - 60 * (60 - m)
            ok = int(rate * (0.7 + 0.3 * rng.random()) * (1.3 if 20 < m < 35 else 1.0))
            retried, dead = rng.randint(0, ok // 25), int(rng.random() < 0.15)
            buckets = [0] * 13
            for _ in range(ok + retried + dead):
                buckets[min(12, max(0, int(rng.gauss(3 if seconds < 0.1 else 4, 0.8))))] += 1
            rows.append((minute, queue, "default", "", ok, retried + dead, retried, 0, dead,
                         ok * seconds, buckets))  # fmt: skip
    return served.queue.record_history(rows)


async def _all(tasks: list[asyncio.Task[None]]) -> None:
    await asyncio.gather(*tasks)


def test_overview_screenshot_under_load(page: Any, serve: Any, tmp_path: Path) -> None:
    served: Served = serve()
    served.run(_backfill(served))
    workers = []
    for queue, seconds in QUEUES.items():
        served.run(served.queue.enqueue_many([{"n": n} for n in range(JOBS[queue])], queue=queue))
        config = served.config.model_copy(
            update={
                "queue": served.config.queue.model_copy(update={"name": queue, "concurrency": 8})
            }
        )
        workers.append(LoadWorker(config, seconds))
    served.run(served.queue.enqueue_many([{"n": n} for n in range(25)], queue="documents",
                                         run_at=3600))  # fmt: skip

    async def start() -> list[asyncio.Task[None]]:
        return [asyncio.create_task(w.run(install_signal_handlers=False)) for w in workers]

    tasks = served.run(start())
    try:
        page.set_window_size(1300, 1000)
        page.get(served.url("/"))
        # The live refresh replaces the counts the waits read: a stale one is read again.
        stale = (NoSuchElementException, StaleElementReferenceException)
        wait = WebDriverWait(page, 30, poll_frequency=0.2, ignored_exceptions=stale)

        # Under load: some jobs done, some running, some still waiting, on every queue.
        def loaded(driver: Any) -> bool:
            counts = counts_on_page(driver)
            return all(counts.get((q, "succeeded"), 0) > 100 for q in QUEUES) and all(
                counts.get((q, "running"), 0) > 0 for q in ("documents", "thumbnails")
            )

        wait.until(loaded)
        page.execute_script("document.querySelectorAll('img[data-chart]').forEach(i => "
                            "i.src = i.src.split('?')[0] + '?t=' + Date.now())")  # fmt: skip
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('img[data-chart]')]"
            ".every(i => i.complete && i.naturalWidth > 0)"))  # fmt: skip
        target = Path(os.environ.get("WORKER_CORE_SCREENSHOT") or tmp_path / "overview.png")
        target.parent.mkdir(parents=True, exist_ok=True)
        assert page.find_element(By.TAG_NAME, "body").screenshot(str(target))
        data = target.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    finally:
        for w in workers:
            served.run(w.stop(), 60)
        served.run(_all(tasks), 60)
    page.get(served.url("/"))
    WebDriverWait(page, 20, ignored_exceptions=stale).until(
        lambda d: counts_on_page(d) == served.run(counts_in_db(served.queue))
    )
