"""The workers registry: every running worker, visible to operators.

A worker registers when its run starts, refreshes its row (``last_seen``, jobs in
flight) every heartbeat, and removes it when it stops gracefully. A worker that
dies leaves its row behind; readers show it as gone once ``last_seen`` is older
than its lease, and it is forgotten a day later. Rows live in ``{schema}.workers``
(migration 0007).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .logs import StructuredLogger
from .redact import redact_text

if TYPE_CHECKING:
    from .queue import Queue

__all__ = ["WorkerRegistry"]

_PRUNE_EVERY = 3600.0


def _version() -> str:
    from . import __version__

    return __version__


class WorkerRegistry:
    """One worker's row in the registry.

    Args:
        worker_id: the worker's id (``BaseWorker.worker_id``).
        queues: the queues it claims from.
        concurrency: its job slots.
        lease_seconds: after this long without a refresh it counts as gone.
        refresh_seconds: how often ``run`` refreshes the row.
        in_flight: reads how many jobs it runs now.
        kinds: the kinds it claims (None: every kind).
    """

    def __init__(
        self,
        worker_id: str,
        *,
        queues: Sequence[str],
        concurrency: int,
        lease_seconds: float,
        refresh_seconds: float,
        in_flight: Callable[[], int],
        kinds: Sequence[str] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.queues = list(queues)
        self.kinds = None if kinds is None else list(kinds)
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.refresh_seconds = refresh_seconds
        self._in_flight = in_flight
        self._registered = False
        self._log = StructuredLogger("worker_core.registry", worker_id=worker_id)

    def row(self) -> dict[str, Any]:
        return {
            "id": self.worker_id,
            "host": socket.gethostname()[:253],
            "pid": os.getpid(),
            "version": _version(),
            "queues": self.queues,
            "kinds": self.kinds,
            "concurrency": self.concurrency,
            "in_flight": max(0, int(self._in_flight())),
            "lease": self.lease_seconds,
        }

    async def register(self, queue: Queue) -> None:
        """Insert or refresh the row now."""
        await queue.register_worker(self.row())
        self._registered = True

    async def run(self, queue: Queue) -> None:
        """Refresh the row every ``refresh_seconds`` until cancelled; failures are logged
        (the row then ages towards "gone", which is the truth seen from outside)."""
        last_prune = time.monotonic()
        while True:
            if self._registered:  # (at start: the run registered just before)
                await asyncio.sleep(self.refresh_seconds)
            try:
                await self.register(queue)
                if time.monotonic() - last_prune >= _PRUNE_EVERY:
                    last_prune = time.monotonic()
                    await queue.prune_workers()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log.warning(
                    "workers registry refresh failed",
                    error_type=type(exc).__name__,
                    error=redact_text(str(exc))[:300],
                )
                if not self._registered:
                    await asyncio.sleep(self.refresh_seconds)

    async def leave(self, queue: Queue) -> None:
        """Remove the row (graceful stop); never raises."""
        if not self._registered:
            return
        self._registered = False
        with contextlib.suppress(Exception):
            await queue.leave_worker(self.worker_id)
