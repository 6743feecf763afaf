"""The stall watchdog: notices when something blocks the event loop, and names it.

A blocked loop runs no heartbeat: past the lease, another worker rescues the
jobs and this worker's runs are void. A thread pings the loop every quarter of
``queue.stall_warning_seconds``; when a ping goes unanswered that long, it logs a
warning naming the job and stage whose task holds the loop (read while the loop
is still blocked), counts the stall in metrics, and logs again once the loop is
back with how long it was blocked. The fix is ``await ctx.offload(fn, ...)``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from .logs import StructuredLogger
from .metrics import ProcessingMetrics

__all__ = ["StallWatchdog"]

#: What a stalled task is doing: job_id, stage, ... (empty when not a job's task).
Describe = Callable[["asyncio.Task[Any] | None"], dict[str, Any]]


class StallWatchdog:
    """A daemon thread watching one event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        threshold: float,
        *,
        describe: Describe,
        metrics: ProcessingMetrics,
        logger: StructuredLogger,
    ) -> None:
        self._loop = loop
        self._threshold = threshold
        self._describe = describe
        self._metrics = metrics
        self._logger = logger
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._watch, name="worker_core.stall-watchdog", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self._threshold + 1.0)

    def _watch(self) -> None:
        interval = self._threshold / 4
        while not self._stop.wait(interval):
            answered = threading.Event()
            try:
                self._loop.call_soon_threadsafe(answered.set)
            except RuntimeError:
                return  # the loop is closed
            sent = time.monotonic()
            if answered.wait(self._threshold) or self._stop.is_set():
                continue
            self._stalled(answered, sent)

    def _stalled(self, answered: threading.Event, sent: float) -> None:
        try:
            # Read from this thread while the loop's thread is stuck in the task: the
            # task cannot change under us, and the lookup is a dict read.
            task = asyncio.current_task(self._loop)
            about = self._describe(task)
        except Exception:
            about = {}
        self._metrics.loop_stalled()
        self._logger.warning(
            "event loop blocked: no heartbeat or other job runs meanwhile; "
            "move blocking or CPU-bound work to ctx.offload()",
            blocked_seconds=round(time.monotonic() - sent, 3),
            threshold=self._threshold,
            **about,
        )
        while not answered.wait(self._threshold):
            if self._stop.is_set():
                return
        self._logger.info(
            "event loop unblocked", blocked_seconds=round(time.monotonic() - sent, 3), **about
        )
