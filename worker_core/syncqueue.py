"""SyncQueue: the producer's and operator's methods of ``Queue``, blocking.

For synchronous code (a Django or Flask view, a script, a thread): the same
checks, the same statements and the same answers as ``Queue``, because both drive
the plans of ``worker_core._statements`` (only the connection differs). It opens a
psycopg (sync) connection pool; ``connection=`` takes a psycopg ``Connection`` and
joins the caller's transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads

from . import _tracing
from ._statements import Plan, Statement, Statements, drive_step, own_transaction
from .config import WorkerConfig
from .jobs import Job
from .redact import mask_dsn, redact_text

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

__all__ = ["SyncQueue"]

T = TypeVar("T")


class SyncQueue:
    """Enqueue, inspect and operate jobs from synchronous code.

    ``with SyncQueue(config) as queue: queue.enqueue({...})``. Thread-safe: the pool
    lends each call its own connection. A given ``pool`` is left open on exit.
    """

    def __init__(self, config: WorkerConfig, *, pool: ConnectionPool | None = None) -> None:
        self.config = config
        self.schema = config.database.schema
        self._statements = Statements(config)
        self._pool = pool
        self._owns_pool = pool is None

    def __repr__(self) -> str:
        return f"SyncQueue(schema={self.schema!r}, queue={self.config.queue.name!r})"

    # -- lifecycle ---------------------------------------------------------------
    def open(self) -> SyncQueue:
        if self._pool is None:
            self._pool = _open_pool(self.config)
            self._owns_pool = True
        return self

    def close(self) -> None:
        if self._pool is not None and self._owns_pool:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> SyncQueue:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            raise RuntimeError("SyncQueue is not open: use `with SyncQueue(config) as queue:`")
        return self._pool

    @contextmanager
    def connection(self, connection: Connection[Any] | None = None) -> Iterator[Connection[Any]]:
        """Lend ``connection`` if given, else a pooled autocommit connection."""
        if connection is not None:
            if not isinstance(connection, Connection):
                raise TypeError(
                    "connection= must be a psycopg (3) Connection, not "
                    f"{type(connection).__module__}.{type(connection).__name__}"
                )
            yield connection
        else:
            with self.pool.connection() as conn:
                yield conn

    # -- producing ---------------------------------------------------------------
    def enqueue(
        self,
        payload: Mapping[str, Any],
        *,
        queue: str | None = None,
        priority: int = 0,
        run_at: datetime | timedelta | float | None = None,
        max_attempts: int | None = None,
        dedupe_key: str | None = None,
        correlation_id: str | None = None,
        connection: Connection[Any] | None = None,
        kind: str = "default",
    ) -> int:
        """Add one job; returns its id (see ``Queue.enqueue``).

        With ``connection=`` the insert joins the caller's transaction: the job
        exists, and workers are woken, only if it commits.
        """
        ids = self._enqueue(
            [payload],
            kind=kind,
            queue=queue,
            priority=priority,
            run_at=run_at,
            max_attempts=max_attempts,
            dedupe_keys=[dedupe_key],
            correlation_ids=[correlation_id],
            connection=connection,
            label="payload",
        )
        return ids[0]

    def enqueue_many(
        self,
        payloads: Sequence[Mapping[str, Any]],
        *,
        queue: str | None = None,
        priority: int = 0,
        run_at: datetime | timedelta | float | None = None,
        max_attempts: int | None = None,
        dedupe_keys: Sequence[str | None] | None = None,
        correlation_ids: Sequence[str | None] | None = None,
        connection: Connection[Any] | None = None,
        kind: str = "default",
    ) -> list[int]:
        """Add many jobs, all or none; returns the ids in input order (see
        ``Queue.enqueue_many``)."""
        return self._enqueue(
            payloads,
            kind=kind,
            queue=queue,
            priority=priority,
            run_at=run_at,
            max_attempts=max_attempts,
            dedupe_keys=dedupe_keys,
            correlation_ids=correlation_ids,
            connection=connection,
            label="payloads",
        )

    def _enqueue(
        self,
        payloads: Sequence[Mapping[str, Any]],
        *,
        connection: Connection[Any] | None,
        **kwargs: Any,
    ) -> list[int]:
        with _tracing.producer(self._statements, payloads, kwargs) as span:
            plan = self._statements.enqueue(payloads, state=span.state, **kwargs)
            ids = self._run(plan, connection)
            span.sent(ids)
            return ids

    def _run(self, plan: Plan[T], connection: Connection[Any] | None = None) -> T:
        statement = drive_step(plan, None)
        if statement is None:
            return cast(T, plan.result)
        with self.connection(connection) as conn:
            if plan.atomic and own_transaction(conn):
                with conn.transaction():
                    return _drive(conn, plan, statement)
            return _drive(conn, plan, statement)

    # -- inspecting and operating ------------------------------------------------
    def get(self, job_id: int) -> Job | None:
        """The job with this id, or ``None``."""
        return self._run(self._statements.get(job_id))

    def stats(self, queue: str | None = None) -> dict[str, int]:
        """A count for every ``JobStatus`` value (zeros included), for one queue or all."""
        return self._run(self._statements.stats(queue))

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[Job]:
        """Dead jobs, newest first, with payload, stage, state and error history."""
        return self._run(self._statements.dead_letters(queue, limit))

    def requeue(self, job_ids: int | Sequence[int]) -> int:
        """Move dead jobs back to ``queued`` with fresh attempts; returns how many moved."""
        return self._run(self._statements.requeue(job_ids))

    def cancel(self, job_id: int) -> bool:
        """Cancel a queued job, or ask the worker running it to stop it; ``False`` if
        the job is finished or unknown (see ``Queue.cancel``)."""
        return self._run(self._statements.cancel(job_id))

    def rescue(self, limit: int = 1000) -> int:
        """Return jobs whose lease expired to queued (or dead); returns how many moved."""
        return len(self._run(self._statements.rescue(limit)))


def _drive(conn: Connection[Any], plan: Plan[T], statement: Statement | None) -> T:
    while statement is not None:
        if statement.dict_rows:
            cur: Any = conn.cursor(row_factory=dict_row)
            cur.execute(statement.query, statement.params)
        else:
            cur = conn.execute(statement.query, statement.params)
        rows = cur.fetchall() if cur.description is not None else []
        statement = drive_step(plan, rows)
    return cast(T, plan.result)


def _open_pool(config: WorkerConfig) -> ConnectionPool:
    """An autocommit pool for ``config``, or one clear ``ConnectionError`` (the same
    rules as the async pool: a failure no retry can fix is raised at once)."""
    from psycopg_pool import ConnectionPool, PoolTimeout

    from ._connect import (
        RECONNECT_SERIES_SECONDS,
        connect_failure_hint,
        opening_series_seconds,
        server_message,
    )

    db = config.database
    dsn = config.dsn()
    where = mask_dsn(dsn)
    last_error: str | None = None
    try:  # one direct connection first: a wrong password fails now, with its reason
        Connection.connect(
            dsn, autocommit=True, application_name=db.application_name, **db.connection_params(dsn)
        ).close()
    except Exception as exc:
        last_error = redact_text(server_message(exc), config.secrets())
        hint = connect_failure_hint(exc)
        if hint is not None:
            raise ConnectionError(
                f"cannot connect to PostgreSQL at {where}: {last_error} (hint: {hint})"
            ) from None
    pool = ConnectionPool(
        dsn,
        min_size=db.pool_min_size,
        max_size=max(db.pool_max_size, db.pool_min_size),
        open=False,
        kwargs={
            "autocommit": True,
            "prepare_threshold": db.prepare_threshold,
            "application_name": db.application_name,
            # TCP keepalives and the connect timeout, as on the async pool.
            **db.connection_params(dsn),
        },
        name=f"worker_core.sync.{db.schema}",
        configure=_configure_connection,
        timeout=db.connect_timeout,
        reconnect_timeout=opening_series_seconds(db.connect_timeout),
        reconnect_failed=_new_series,
    )
    try:
        pool.open(wait=True, timeout=db.connect_timeout)
        pool.reconnect_timeout = RECONNECT_SERIES_SECONDS
    except PoolTimeout:
        pool.close()
        raise ConnectionError(
            f"cannot connect to PostgreSQL at {where} within {db.connect_timeout:g}s: "
            f"{last_error or 'no connection was made'}"
        ) from None
    return pool


def _new_series(pool: ConnectionPool) -> None:
    """A series of reconnect attempts gave up: start the next one now."""
    if not pool.closed:
        with contextlib.suppress(Exception):
            pool.check()


def _configure_connection(conn: Connection[Any]) -> None:
    # The async pool's reasoning: orjson parses the jsonb columns faster when installed.
    from ._connect import _BACKEND_PID, _ORJSON_LOADS

    if _ORJSON_LOADS is not None:
        set_json_loads(_ORJSON_LOADS, conn)
    if conn.prepare_threshold is not None and sync_behind_pooler(conn, _BACKEND_PID):
        # Behind a transaction pooler prepared statements do not survive from one
        # transaction to the next (see _connect.open_pool): turn them off.
        conn.prepare_threshold = None


def sync_behind_pooler(conn: Connection[Any], query: bytes) -> bool:
    """``_connect.behind_pooler`` for a blocking connection."""
    row = conn.execute(query, prepare=False).fetchone()
    return row is not None and int(row[0]) != conn.info.backend_pid
