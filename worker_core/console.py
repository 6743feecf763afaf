"""The worker side of the operations console, composed for one worker.

``WorkerConsole`` holds a worker's ``HistoryRecorder`` (it lives as long as the
worker, so counts survive between runs), its workers-registry row and its alert
evaluator. The executor counts attempts and stages straight into ``recorder``
(that HistoryRecorder, or None while history is off); the runtime calls
``start`` when a run starts (the worker registers) and ``stop`` when it ends
(last rollups written, registry left); the maintenance component runs the three
periodic loops (``flush_loop``, ``registry.run``, ``alerts.run``). Nothing here
knows the worker class.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .alerts import AlertEvaluator
from .history import HistoryRecorder
from .logs import StructuredLogger
from .redact import redact_text
from .registry import WorkerRegistry

if TYPE_CHECKING:
    from .config import WorkerConfig
    from .queue import Queue

__all__ = ["WorkerConsole"]

_PRUNE_EVERY = 3600.0


class WorkerConsole:
    """History, registry and alerts of one worker.

    Args:
        config: the worker's configuration.
        worker_id: the worker's id.
        in_flight: reads how many jobs the worker runs now.
        kinds: the kinds it claims (None: all).
    """

    def __init__(
        self,
        config: WorkerConfig,
        worker_id: str,
        *,
        in_flight: Callable[[], int],
        kinds: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.history = HistoryRecorder()
        self._history_on = config.history.enabled
        self.registry = WorkerRegistry(
            worker_id,
            queues=list(config.queue.names),
            kinds=kinds,
            concurrency=config.queue.concurrency,
            lease_seconds=config.queue.lease_seconds,
            refresh_seconds=config.queue.heartbeat_seconds,
            in_flight=in_flight,
        )
        self.alerts = AlertEvaluator(config.alerts, worker_id, secrets=config.secrets())
        self._queue: Queue | None = None
        self._log = StructuredLogger("worker_core.console", worker_id=worker_id)

    # -- recording (no I/O) --------------------------------------------------------
    @property
    def recorder(self) -> HistoryRecorder | None:
        """Where the executor counts attempts and stages (None: history is off, and
        a job costs no call for it)."""
        return self.history if self._history_on else None

    # -- a run -----------------------------------------------------------------------
    async def start(self, queue: Queue) -> None:
        """A run starts: register the worker now (a failure is logged; the registry
        loop retries)."""
        self._queue = queue
        try:
            await self.registry.register(queue)
        except Exception as exc:
            self._log.warning("could not register in the workers registry", error=_err(exc))

    async def stop(self) -> None:
        """After the loops were cancelled: write the last rollups, leave the registry,
        hand the alerts lease back. Never raises."""
        queue, self._queue = self._queue, None
        if queue is None:
            return
        if self.config.history.enabled:
            try:
                async with asyncio.timeout(5.0):
                    await self.history.flush(queue)
            except Exception as exc:
                self._log.warning("could not write the last metrics history", error=_err(exc))
        await self.registry.leave(queue)
        await self.alerts.release(queue)

    async def flush_loop(self, queue: Queue) -> None:
        """Write the rollups every ``history.flush_seconds`` (prune now and then)."""
        settings = self.config.history
        # A fleet started together spreads its flushes and its pruning over time.
        await asyncio.sleep(settings.flush_seconds * random.random())
        last_prune = time.monotonic() - _PRUNE_EVERY * random.random()
        while True:
            try:
                await self.history.flush(queue)
                if time.monotonic() - last_prune >= _PRUNE_EVERY:
                    last_prune = time.monotonic()
                    await queue.prune_history(settings.retention_days)
                    await queue.prune_alerts()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log.warning(
                    "metrics history flush failed; kept for the next one",
                    error=_err(exc),
                    pending=len(self.history),
                )
            await asyncio.sleep(settings.flush_seconds)


def _err(exc: BaseException) -> str:
    with contextlib.suppress(Exception):
        return redact_text(f"{type(exc).__name__}: {exc}")[:300]
    return type(exc).__name__
