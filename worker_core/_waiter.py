"""The waiter: one LISTEN connection per ``Queue`` that wakes ``Queue.wait`` calls.

The statements that move a waited-for job to succeeded, dead or cancelled send a
NOTIFY with its id on the schema's done channel. The first ``wait`` opens the
connection (``database.listen_dsn`` when set, else ``database.dsn``); every later
wait of the same Queue shares it, until ``Queue.close()``. While the connection
is down, or reconnecting, waiters fall back to reading their job every
``queue.poll_interval``; each time it comes back, every waiter reads its job
once (a NOTIFY sent meanwhile is lost). A connection that reaches PostgreSQL
through a pooler (PgBouncer), where LISTEN never delivers, is closed at once and
waiters poll: set ``database.listen_dsn`` to the server itself to be woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterator

from .config import WorkerConfig
from .logs import StructuredLogger
from .redact import redact_text

__all__ = ["Waiter"]

#: While LISTEN is up, a waiter still reads its job this often: a last resort should
#: a notification be lost in a way the connection does not show.
SAFETY_POLL = 30.0


class Waiter:
    """Routes done-channel notifications to the ``wait`` calls of one Queue."""

    def __init__(self, config: WorkerConfig, channel: str) -> None:
        self._config = config
        self._channel = channel
        self._events: dict[int, set[asyncio.Event]] = {}
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._log = StructuredLogger("worker_core.queue")
        self._rng = random.Random()
        #: The LISTEN target is a pooler: never LISTEN, waiters poll.
        self._pooled = False

    @contextlib.contextmanager
    def watch(self, job_id: int) -> Iterator[asyncio.Event]:
        """An event set whenever job ``job_id`` may have ended, while the block runs."""
        event = asyncio.Event()
        self._events.setdefault(job_id, set()).add(event)
        if not self._pooled and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._listen(), name="worker_core.wait")
        try:
            yield event
        finally:
            events = self._events.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[job_id]

    async def listening(self) -> None:
        """Return once LISTEN is up, or after one poll interval (then waiters poll)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._config.queue.poll_interval):
                await self._up.wait()

    async def until(self, event: asyncio.Event, poll: float) -> None:
        """Sleep until ``event`` is set, or the next poll is due."""
        timeout = SAFETY_POLL if self._up.is_set() else poll
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()
        event.clear()

    def _wake(self, job_id: int | None = None) -> None:
        if job_id is None:
            targets = [e for events in self._events.values() for e in events]
        else:
            targets = list(self._events.get(job_id, ()))
        for event in targets:
            event.set()

    async def _listen(self) -> None:
        from psycopg import AsyncConnection, sql

        from ._connect import behind_pooler

        database = self._config.database
        delay = 0.1
        while True:
            conn = None
            try:
                dsn = self._config.listen_dsn()
                conn = await AsyncConnection.connect(
                    dsn,
                    autocommit=True,
                    application_name=f"{database.application_name}.wait"[:63],
                    # Keepalives and connect_timeout, as on every connection of ours.
                    **database.connection_params(dsn),
                )
                if await behind_pooler(conn):
                    self._pooled = True
                    self._log.warning(
                        "wait: the LISTEN target is a connection pooler, where "
                        "notifications never arrive; waits poll every queue.poll_interval "
                        "(set database.listen_dsn to the server itself)"
                    )
                    return
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                self._up.set()
                delay = 0.1
                self._wake()  # anything that ended before LISTEN was up is read now
                while True:
                    async for notice in conn.notifies(timeout=5.0):
                        try:
                            job_id = int(notice.payload)
                        except ValueError:
                            continue
                        self._wake(job_id)
                    await conn.execute("SELECT 1")  # a dead connection shows here
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._up.is_set():
                    self._log.warning(
                        "wait: LISTEN connection lost; polling until it is back",
                        error=redact_text(str(exc), self._config.secrets()),
                        error_type=type(exc).__name__,
                    )
                self._up.clear()
                self._wake()
                await asyncio.sleep(delay * (0.5 + self._rng.random()))
                delay = min(delay * 2, 2.0)
            finally:
                self._up.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
