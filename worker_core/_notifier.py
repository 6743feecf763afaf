"""The notifier: one LISTEN connection that wakes an idle worker when jobs arrive.

It listens on the schema's job channel (payload: the queue name) and on the
breaker channel (a fleet breaker tripped elsewhere). It connects with
``database.listen_dsn`` when set (a direct server address for fleets whose pool
goes through PgBouncer in transaction mode, where LISTEN does not work), else
with ``database.dsn``. While it is down the claim loop polls every
``queue.poll_interval``; it reconnects with capped, jittered backoff and, once
back, makes the worker look for work it may have missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

from .config import WorkerConfig
from .logs import StructuredLogger
from .queue import Queue
from .redact import redact_text

__all__ = ["Notifier"]


class Notifier:
    """LISTEN for one ``run()`` of a worker."""

    def __init__(
        self,
        config: WorkerConfig,
        queue: Queue,
        logger: StructuredLogger,
        *,
        on_work: Callable[[], None],
        on_breaker_trip: Callable[[], None],
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._channel = queue.channel
        self._breaker_channel = queue.breaker_channel
        self._logger = logger
        self._on_work = on_work
        self._on_breaker_trip = on_breaker_trip
        self._rng = rng or random.Random()
        self._secrets = tuple(config.secrets())
        #: The LISTEN connection is up now.
        self.connected = False
        #: How many times it was (re)established.
        self.connects = 0

    async def run(self) -> None:
        from psycopg import AsyncConnection, sql

        delay = 0.1
        failing = False
        name = self._config.queue.name
        database = self._config.database
        while True:
            conn = None
            try:
                conn = await AsyncConnection.connect(
                    self._config.listen_dsn(),
                    autocommit=True,
                    connect_timeout=max(1, int(database.connect_timeout)),
                    application_name=f"{database.application_name}.listen"[:63],
                )
                for channel in (self._channel, self._breaker_channel):
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                self.connected = True
                self.connects += 1
                delay, failing = 0.1, False
                self._on_work()  # catch up on what was sent while disconnected
                while True:
                    async for notice in conn.notifies(timeout=30.0):
                        if notice.channel == self._breaker_channel:
                            self._on_breaker_trip()
                        elif notice.payload == name:
                            self._on_work()
                    await conn.execute("SELECT 1")  # a dead connection shows here
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected or not failing:  # once per outage, not once per retry
                    self._logger.warning(
                        "LISTEN connection lost; polling until it is back"
                        if self.connected
                        else "LISTEN connection failed; polling until it works",
                        error=redact_text(str(exc), self._secrets),
                        error_type=type(exc).__name__,
                        poll_interval=self._config.queue.poll_interval,
                    )
                failing = True
                self.connected = False
                await asyncio.sleep(delay * (0.5 + self._rng.random()))
                delay = min(delay * 2, 2.0)
            finally:
                self.connected = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
