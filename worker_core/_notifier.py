"""The notifier: one LISTEN connection that wakes an idle worker when jobs arrive.

It listens on the schema's job channel (payload: the queue name), on the
breaker channel (a fleet breaker tripped elsewhere) and on the control channel
(an operator cancelled a running job, or paused or resumed a queue: JSON
payloads written by ``Queue.cancel``, ``pause`` and ``resume``). It connects with
``database.listen_dsn`` when set (a direct server address for fleets whose pool
goes through PgBouncer in transaction mode, where LISTEN does not work), else
with ``database.dsn``. While it is down the claim loop polls every
``queue.poll_interval``; it reconnects with capped, jittered backoff and, once
back, makes the worker look for work it may have missed.

LISTEN through a transaction pooler is accepted and then never delivers a
notification (the session that listened goes back to the pool), so a pooled
target is recognised (``behind_pooler``): without ``listen_dsn`` the worker
polls only, and a ``listen_dsn`` that is itself pooled is refused at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import WorkerConfig
from .logs import StructuredLogger
from .queue import Queue, behind_pooler
from .redact import mask_dsn, redact_text

if TYPE_CHECKING:
    from psycopg import AsyncConnection

__all__ = ["Notifier", "check_listen_target", "listen_application_name"]

_POOLED_LISTEN_DSN = (
    "database.listen_dsn reaches PostgreSQL through a connection pooler (PgBouncer?), "
    "where LISTEN never delivers a notification: point it at the server itself, "
    "or leave it unset to poll"
)


async def check_listen_target(
    config: WorkerConfig, logger: StructuredLogger, *, pooled: bool | None = None
) -> bool:
    """Whether the worker may LISTEN; False means it polls only. ``pooled``: whether
    ``config.listen_dsn()`` reaches a pooler, if already known (else asked here).

    Raises:
        RuntimeError: ``database.listen_dsn`` goes through a connection pooler.
    """
    from psycopg import AsyncConnection

    dsn = config.listen_dsn()
    if pooled is None:
        try:
            conn = await AsyncConnection.connect(
                dsn, autocommit=True, **config.database.connection_params(dsn)
            )
        except Exception:
            return True  # unreachable now: the notifier retries and the worker polls meanwhile
        try:
            pooled = await behind_pooler(conn)
        finally:
            await conn.close()
    if not pooled:
        return True
    if config.database.listen_dsn is not None:
        raise RuntimeError(f"{_POOLED_LISTEN_DSN} ({mask_dsn(dsn)})")
    logger.warning(
        "LISTEN is off: database.dsn goes through a connection pooler, so workers poll; "
        "set database.listen_dsn to the server's own address for instant wake-ups",
        poll_interval=config.queue.poll_interval,
    )
    return False


def listen_application_name(config: WorkerConfig) -> str:
    """The ``application_name`` of a worker's LISTEN connection."""
    return f"{config.database.application_name}.listen"[:63]


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
        on_cancel: Callable[[int], object] | None = None,
        on_pause: Callable[[list[str], bool], None] | None = None,
        on_connect: Callable[[], None] | None = None,
        rng: random.Random | None = None,
        enabled: bool = True,
        first_connection: AsyncConnection[Any] | None = None,
    ) -> None:
        self._config = config
        #: An open connection to LISTEN on first (to the listen DSN, no pooler in
        #: between, autocommit): the worker's start-up probe. Owned from here on.
        self._first = first_connection
        #: False: LISTEN is off (the target is a pooler) and the worker polls only.
        self.enabled = enabled
        self._channel = queue.channel
        self._breaker_channel = queue.breaker_channel
        self._control_channel = queue.control_channel
        self._on_cancel = on_cancel
        self._on_pause = on_pause
        self._on_connect = on_connect
        self._logger = logger
        self._on_work = on_work
        self._on_breaker_trip = on_breaker_trip
        self._rng = rng or random.Random()
        self._secrets = tuple(config.secrets())
        #: The LISTEN connection is up now.
        self.connected = False
        #: How many times it was (re)established.
        self.connects = 0
        #: Set once the first attempt to LISTEN ended, whichever way.
        self.first_attempt = asyncio.Event()

    async def run(self) -> None:
        from psycopg import AsyncConnection, sql

        delay = 0.1
        failing = False
        names = frozenset(self._config.queue.names)
        database = self._config.database
        dsn = self._config.listen_dsn()
        name = listen_application_name(config=self._config)
        while self.enabled:
            conn, first, self._first = self._first, self._first is not None, None
            try:
                if conn is None:
                    conn = await AsyncConnection.connect(
                        dsn,
                        autocommit=True,
                        application_name=name,
                        # Keepalives: an idle LISTEN connection on a dead path is otherwise
                        # never noticed, and the worker would wait for NOTIFYs forever.
                        **database.connection_params(dsn),
                    )
                if not first and await behind_pooler(conn):  # it became one since start-up
                    self._logger.error(_POOLED_LISTEN_DSN + "; polling only")
                    self.enabled = False
                    self.first_attempt.set()
                    return
                for channel in (self._channel, self._breaker_channel, self._control_channel):
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                self.connected = True
                self.connects += 1
                delay, failing = 0.1, False
                self._on_work()  # catch up on what was sent while disconnected
                if self._on_connect is not None:
                    self._on_connect()
                self.first_attempt.set()
                while True:
                    async for notice in conn.notifies(timeout=30.0):
                        if notice.channel == self._breaker_channel:
                            self._on_breaker_trip()
                        elif notice.channel == self._control_channel:
                            self._control(notice.payload)
                        elif notice.payload in names:
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
                self.first_attempt.set()
                await asyncio.sleep(delay * (0.5 + self._rng.random()))
                delay = min(delay * 2, 2.0)
            finally:
                self.connected = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
        await self.close_unused()

    async def close_unused(self) -> None:
        """Close the first connection if ``run`` never took it (LISTEN is off)."""
        conn, self._first = self._first, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    def _control(self, payload: str) -> None:
        """Act on an operator's command; anything malformed is ignored (anyone who may
        NOTIFY could send it, and a command only ever asks, the database decides)."""
        try:
            command = json.loads(payload)
            op = command["op"]
            if op == "cancel" and self._on_cancel is not None:
                job_id = command["id"]
                if isinstance(job_id, int) and not isinstance(job_id, bool):
                    self._on_cancel(job_id)
            elif op in ("pause", "resume") and self._on_pause is not None:
                queue = command["queue"]
                if isinstance(queue, str):
                    self._on_pause([queue], op == "pause")
        except (ValueError, TypeError, KeyError):
            return
