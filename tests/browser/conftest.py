"""Browser tests: Debian's headless Chromium driven by Selenium through
/usr/bin/chromedriver (nothing is downloaded at run time; `make browser-deps`
installs both packages). Without them the tests skip with one line saying how to
install them, except in CI (CI=true), where they fail.

The dashboard, the workers and the test's database calls run on one event loop in
a background thread, so the blocking Selenium calls of a test never stall the
server the browser talks to.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from worker_core import BaseWorker, PermanentError, Queue, StageContext
from worker_core.config import WorkerConfig

CHROMIUM = Path(os.environ.get("WORKER_CORE_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("WORKER_CORE_CHROMEDRIVER", "/usr/bin/chromedriver"))
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,900",
)  # fmt: skip
T = TypeVar("T")


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (path.exists() and os.access(path, os.X_OK)):
            return f"{path} not found"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for the session (cookies are cleared per test)."""
    missing = _missing()
    if missing:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"browser tests must run in CI: {missing} (run `make browser-deps`)")
        pytest.skip(f"{missing}: run `make browser-deps` (Debian chromium + chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="wc-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: Any) -> Any:
    """The browser with no cookies left from another test."""
    browser.execute_cdp_cmd("Network.clearBrowserCookies", {})
    browser.get("about:blank")
    return browser


class Loop:
    """An event loop running in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Step:
    """Fails permanently while the job's key is in ``broken``; blocks while ``hold`` is
    set and the payload asks to wait."""

    name = "step"

    def __init__(self, broken: set[str], hold: asyncio.Event) -> None:
        self.broken = broken
        self.hold = hold

    async def run(self, ctx: StageContext) -> None:
        if ctx.job.payload.get("key") in self.broken:
            raise PermanentError(f"cannot process {ctx.job.payload.get('key')}")
        if ctx.job.payload.get("wait"):
            await self.hold.wait()
        ctx.state["done"] = True


class ConsoleWorker(BaseWorker):
    def __init__(self, config: WorkerConfig, step: Step) -> None:
        super().__init__(config)
        self.step = step

    def stages(self) -> list[Any]:
        return [self.step]


@dataclass
class Served:
    """A dashboard served on 127.0.0.1 from the background loop, and its database."""

    loop: Loop
    config: WorkerConfig
    queue: Queue
    base: str
    broken: set[str] = field(default_factory=set)
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    cleanups: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return self.loop.run(coro, timeout)

    def worker(self) -> ConsoleWorker:
        return ConsoleWorker(self.config, Step(self.broken, self.hold))

    def drain(self) -> ConsoleWorker:
        """Run a worker until no job is ready and none is in flight."""
        worker = self.worker()
        self.run(worker.run(until_empty=True, install_signal_handlers=False), 90)
        return worker

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def serve(make_config: Callable[..., WorkerConfig]) -> Iterator[Callable[..., Served]]:
    """Start a dashboard (``serve(read_only=..., token=...)``) on a migrated schema."""
    from aiohttp import web

    from worker_core.dashboard import create_app

    loop = Loop()
    started: list[Served] = []

    def start(read_only: bool = False, **dashboard: Any) -> Served:
        config = make_config(
            dashboard={"refresh_seconds": 0.2, **dashboard},
            history={"flush_seconds": 0.2},
            queue={"heartbeat_seconds": 0.5},
        )

        async def up() -> Served:
            queue = Queue(config)
            await queue.open()
            await queue.migrate()
            runner = web.AppRunner(create_app(config, read_only=read_only), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            served = Served(loop, config, queue, f"http://127.0.0.1:{runner.addresses[0][1]}")
            served.hold = asyncio.Event()
            served.cleanups += [runner.cleanup, queue.close]
            return served

        served = loop.run(up())
        started.append(served)
        return served

    try:
        yield start
    finally:
        for served in started:
            loop.loop.call_soon_threadsafe(served.hold.set)
            for cleanup in served.cleanups:
                loop.run(cleanup())
        loop.close()


def counts_on_page(driver: Any) -> dict[tuple[str, str], int]:
    """Every count of the page that carries data-queue and data-status."""
    from selenium.webdriver.common.by import By

    found = {}
    for el in driver.find_elements(By.CSS_SELECTOR, "[data-queue][data-status]"):
        found[(el.get_attribute("data-queue"), el.get_attribute("data-status"))] = int(el.text)
    return found


async def counts_in_db(queue: Queue) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    total: dict[str, int] = {}
    for row in await queue.overview():
        for status in ("queued", "running", "succeeded", "dead", "cancelled"):
            out[(row["queue"], status)] = int(row[status])
            total[status] = total.get(status, 0) + int(row[status])
    for status, n in total.items():
        out[("*", status)] = n
    return out
