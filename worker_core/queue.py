"""Queue: the producer's and operator's handle, and the only module that runs queue SQL.

Producers ``enqueue``; operators ``get``, ``stats``, ``dead_letters``, ``requeue``,
``cancel`` and ``rescue``; ``migrate`` installs or upgrades the schema. The worker
protocol methods (``claim``, ``heartbeat``, ``finish``, ``rescue_expired``,
``prune``) are what ``BaseWorker`` drives; they are public so other runtimes can
drive them too. Every claim hands out a lease token; ``heartbeat`` and ``finish``
are fenced by it (see ``worker_core.outcomes``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads

from .config import WorkerConfig
from .jobs import (
    DEFERRED,
    REFUNDED,
    RUN_EVENTS,
    TRANSITIONS,
    Job,
    JobStatus,
    Transition,
    dump_json,
    dump_json_objects,
)
from .logs import StructuredLogger
from .outcomes import MAX_ERROR_RECORDS, Outcome
from .redact import mask_dsn
from .sql import load_queries, migrations, render

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

__all__ = [
    "Outcome",
    "Queue",
    "breaker_channel_name",
    "channel_name",
    "open_pool",
    "outcomes_json",
]

_ON_CONFLICT = sql.SQL(
    "ON CONFLICT (queue, dedupe_key) "
    "WHERE dedupe_key IS NOT NULL AND status IN ('queued', 'running') DO NOTHING"
)


def channel_name(schema: str) -> str:
    """The LISTEN/NOTIFY channel of a schema (payload: the queue name)."""
    name = f"worker_core_{schema}"
    if len(name) > 63:
        name = "worker_core_" + hashlib.sha1(schema.encode()).hexdigest()
    return name


def breaker_channel_name(schema: str) -> str:
    """The channel on which a fleet breaker trip is announced (payload: its name)."""
    name = f"worker_core_{schema}_breakers"
    if len(name) > 63:
        name = "worker_core_b_" + hashlib.sha1(schema.encode()).hexdigest()
    return name


async def open_pool(
    config: WorkerConfig, *, min_size: int | None = None, max_size: int | None = None
) -> AsyncConnectionPool:
    """Open an autocommit connection pool for ``config``, or fail with one clear line."""
    from psycopg_pool import AsyncConnectionPool, PoolTimeout

    db = config.database
    pool = AsyncConnectionPool(
        config.dsn(),
        min_size=min_size or db.pool_min_size,
        max_size=max(max_size or db.pool_max_size, min_size or db.pool_min_size),
        open=False,
        kwargs={
            "autocommit": True,
            "prepare_threshold": db.prepare_threshold,
            "application_name": db.application_name,
            "connect_timeout": max(1, int(db.connect_timeout)),
        },
        name=f"worker_core.{db.schema}",
        configure=_configure_connection,
        timeout=db.connect_timeout,
        reconnect_timeout=max(60.0, db.connect_timeout),
    )
    try:
        await pool.open(wait=True, timeout=db.connect_timeout)
    except PoolTimeout:
        await pool.close()
        raise ConnectionError(
            f"cannot connect to PostgreSQL at {mask_dsn(config.dsn())} "
            f"within {db.connect_timeout:g}s"
        ) from None
    return pool


async def _configure_connection(conn: AsyncConnection[Any]) -> None:
    # jsonb columns (payload, state, errors) are parsed on every claim: orjson, when
    # installed (the `fast` extra), parses them several times faster than json.
    if _ORJSON_LOADS is not None:
        set_json_loads(_ORJSON_LOADS, conn)


def _orjson_loads() -> Any:
    try:
        import orjson
    except ImportError:
        return None
    return orjson.loads


_ORJSON_LOADS = _orjson_loads()


class Queue:
    """Enqueue, inspect and operate jobs in one schema.

    Use it as an async context manager; it opens a connection pool unless one is
    given (a given pool is left open on exit).
    """

    def __init__(self, config: WorkerConfig, *, pool: AsyncConnectionPool | None = None) -> None:
        self.config = config
        self.schema = config.database.schema
        self.channel = channel_name(self.schema)
        self.breaker_channel = breaker_channel_name(self.schema)
        self._pool = pool
        self._owns_pool = pool is None
        queries = load_queries()
        parts = {"on_conflict": sql.SQL(""), "transitions": _transitions()}
        self._sql: dict[str, bytes] = {
            name: render(text, self.schema, **parts).as_bytes(None)
            for name, text in queries.items()
        }
        self._sql["enqueue_dedupe"] = render(
            queries["enqueue"], self.schema, on_conflict=_ON_CONFLICT
        ).as_bytes(None)

    def __repr__(self) -> str:
        return f"Queue(schema={self.schema!r}, queue={self.config.queue.name!r})"

    # -- lifecycle ---------------------------------------------------------------
    async def open(self) -> Queue:
        if self._pool is None:
            self._pool = await open_pool(self.config)
            self._owns_pool = True
        return self

    async def close(self) -> None:
        if self._pool is not None and self._owns_pool:
            await self._pool.close()
            self._pool = None

    async def __aenter__(self) -> Queue:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def pool(self) -> AsyncConnectionPool:
        if self._pool is None:
            raise RuntimeError("Queue is not open: use `async with Queue(config) as queue:`")
        return self._pool

    @asynccontextmanager
    async def connection(
        self, connection: AsyncConnection[Any] | None = None
    ) -> AsyncIterator[AsyncConnection[Any]]:
        """Lend ``connection`` if given, else a pooled autocommit connection."""
        if connection is not None:
            yield connection
        else:
            async with self.pool.connection() as conn:
                yield conn

    # -- schema ------------------------------------------------------------------
    async def migrate(self, *, vector: bool | None = None) -> list[int]:
        """Apply every migration not applied yet; returns the versions applied now.

        Idempotent, and safe when several processes run it at once: an advisory
        lock serialises them and the version table records what is done. All
        pending versions apply in one transaction. ``vector``: store embeddings as
        pgvector ``vector(n)`` (True), as ``real[]`` (False) or pgvector when it can
        be installed (None).
        """
        schema_id = sql.Identifier(self.schema)
        async with self.connection() as conn, conn.transaction():
            # Never queue behind a long transaction while holding up every worker.
            await conn.execute("SET LOCAL lock_timeout = '15s'")
            await conn.execute(self._sql["migrate_lock"], {"schema": self.schema})
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema_id))
            await conn.execute(self._sql["migrations_table"])
            cur = await conn.execute(self._sql["applied_migrations"])
            applied = {row[0]: row[2] for row in await cur.fetchall()}
            shipped = {m.version: m for m in migrations()}
            known = set(shipped)
            newer = sorted(v for v in applied if v not in known)
            changed = sorted(
                v
                for v, checksum in applied.items()
                if v in shipped and shipped[v].checksum != checksum
            )
            if changed:
                # Applied migrations are never re-run; a file that changed since means the
                # schema may differ from what this release expects.
                StructuredLogger("worker_core.queue").warning(
                    "applied migrations differ from the files shipped with this release",
                    schema=self.schema,
                    versions=changed,
                )
            if newer:
                raise RuntimeError(
                    f"schema {self.schema!r} has migrations {newer} that this worker_core "
                    "does not know; upgrade worker_core before migrating"
                )
            done: list[int] = []
            for migration in migrations():
                if migration.version in applied:
                    continue
                parts: dict[str, sql.Composable] = {}
                if "{embedding_type}" in migration.text:
                    parts["embedding_type"] = await self._embedding_type(conn, vector)
                await conn.execute(render(migration.text, self.schema, **parts))
                await conn.execute(
                    self._sql["record_migration"],
                    {
                        "version": migration.version,
                        "name": migration.name,
                        "checksum": migration.checksum,
                    },
                )
                done.append(migration.version)
        return done

    async def schema_version(self) -> int:
        """The highest migration applied (0 when the schema is not installed)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL",
                (f"{sql.Identifier(self.schema).as_string(None)}.schema_migrations",),
            )
            row = await cur.fetchone()
            if not row or not row[0]:
                return 0
            cur = await conn.execute(self._sql["applied_migrations"])
            versions = [r[0] for r in await cur.fetchall()]
        return max(versions, default=0)

    async def _embedding_type(
        self, conn: AsyncConnection[Any], vector: bool | None
    ) -> sql.Composable:
        dims = sql.SQL(str(int(self.config.embedding.dimensions)))
        if vector is not False:
            try:
                async with conn.transaction():  # a savepoint: failure keeps the migration going
                    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except Exception:
                if vector:
                    raise
            cur = await conn.execute(self._sql["vector_schema"])
            row = await cur.fetchone()
            if row is not None:
                return sql.SQL("{}.vector({})").format(sql.Identifier(row[0]), dims)
        return sql.SQL("real[]")

    # -- producing ---------------------------------------------------------------
    async def enqueue(
        self,
        payload: Mapping[str, Any],
        *,
        queue: str | None = None,
        priority: int = 0,
        run_at: datetime | timedelta | float | None = None,
        max_attempts: int | None = None,
        dedupe_key: str | None = None,
        correlation_id: str | None = None,
        connection: AsyncConnection[Any] | None = None,
    ) -> int:
        """Add one job; returns its id.

        With ``connection=`` the insert joins the caller's transaction (the job
        exists, and workers are woken, only if it commits). A ``dedupe_key`` held
        by a queued or running job of the same queue returns that job's id.
        ``run_at`` is an aware datetime, a timedelta or seconds from now.
        """
        ids = await self._enqueue(
            [payload],
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

    async def enqueue_many(
        self,
        payloads: Sequence[Mapping[str, Any]],
        *,
        queue: str | None = None,
        priority: int = 0,
        run_at: datetime | timedelta | float | None = None,
        max_attempts: int | None = None,
        dedupe_keys: Sequence[str | None] | None = None,
        correlation_ids: Sequence[str | None] | None = None,
        connection: AsyncConnection[Any] | None = None,
    ) -> list[int]:
        """Add many jobs with one statement per ``queue.enqueue_batch_size`` rows.

        Returns the ids in input order. Several batches run in one transaction, so
        either every job is added or none is.
        """
        return await self._enqueue(
            payloads,
            queue=queue,
            priority=priority,
            run_at=run_at,
            max_attempts=max_attempts,
            dedupe_keys=dedupe_keys,
            correlation_ids=correlation_ids,
            connection=connection,
            label="payloads",
        )

    async def _enqueue(
        self,
        payloads: Sequence[Mapping[str, Any]],
        *,
        queue: str | None,
        priority: int,
        run_at: datetime | timedelta | float | None,
        max_attempts: int | None,
        dedupe_keys: Sequence[str | None] | None,
        correlation_ids: Sequence[str | None] | None,
        connection: AsyncConnection[Any] | None,
        label: str,
    ) -> list[int]:
        n = len(payloads)
        queue_name = self._queue_name(queue)
        keys = _column(dedupe_keys, n, "dedupe_keys")
        cids = _column(correlation_ids, n, "correlation_ids")
        batches = self._payload_batches(payloads, label) if n else []
        params: dict[str, Any] = {
            "queue": queue_name,
            "priority": _int_param(priority, "priority"),
            "max_attempts": _int_param(
                self.config.retry.max_attempts if max_attempts is None else max_attempts,
                "max_attempts",
                minimum=1,
            ),
            "channel": self.channel,
            **_run_at_params(run_at),
        }
        for key in keys:
            if key is not None and (not isinstance(key, str) or not key or "\x00" in key):
                raise ValueError(f"dedupe_key {key!r} must be a non-empty string without NUL")
        for cid in cids:
            if cid is not None and (not isinstance(cid, str) or not 0 < len(cid) <= 200):
                raise ValueError("correlation_id must be a string of 1 to 200 characters")
        if n == 0:
            return []
        async with self.connection(connection) as conn:
            if len(batches) == 1:
                items, text = batches[0]
                return await self._insert(conn, params, items, text, keys, cids)
            ids: list[int] = []
            start = 0
            async with conn.transaction():
                for items, text in batches:
                    end = start + len(items)
                    ids += await self._insert(
                        conn, params, items, text, keys[start:end], cids[start:end]
                    )
                    start = end
            return ids

    def _payload_batches(
        self, payloads: Sequence[Mapping[str, Any]], label: str
    ) -> list[tuple[list[Any], str]]:
        """Batches of (payloads, their JSON array), every payload checked before any SQL."""
        limit = self.config.queue.max_payload_bytes
        if label == "payload":  # a single job: name it "payload" in errors
            payload = payloads[0]
            if not isinstance(payload, Mapping):
                raise TypeError(
                    f"payload must be a dict (a JSON object), not {type(payload).__name__}"
                )
            return [([dict(payload)], f"[{dump_json(payload, 'payload', max_bytes=limit)}]")]
        size = self.config.queue.enqueue_batch_size
        batches = []
        for start in range(0, len(payloads), size):
            part = payloads[start : start + size]
            text = dump_json_objects(part, label, max_bytes=limit, offset=start)
            batches.append(([p if type(p) is dict else dict(p) for p in part], text))
        return batches

    async def _insert(
        self,
        conn: AsyncConnection[Any],
        params: dict[str, Any],
        items: list[Any],
        text: str,
        keys: list[str | None],
        cids: list[str | None],
    ) -> list[int]:
        ids: list[int | None] = [None] * len(items)
        pending = list(range(len(items)))
        for _ in range(5):
            everything = len(pending) == len(items)
            rows_keys = keys if everything else [keys[i] for i in pending]
            rows_cids = cids if everything else [cids[i] for i in pending]
            dedupe = any(k is not None for k in rows_keys)
            cur = await conn.execute(
                self._sql["enqueue_dedupe" if dedupe else "enqueue"],
                {
                    **params,
                    # Checked and serialised up front; a retry of some rows re-serialises them.
                    "payloads": text
                    if everything
                    else json.dumps([items[i] for i in pending], ensure_ascii=False),
                    # NULL instead of a list of NULLs: nothing to adapt item by item.
                    "dedupe_keys": rows_keys if dedupe else None,
                    "correlation_ids": rows_cids if any(c is not None for c in rows_cids) else None,
                },
            )
            rows = await cur.fetchall()
            # Identity values follow the statement's ORDER BY, so the key-less rows'
            # ids, ascending, belong to the key-less inputs in order.
            keyless = iter([r[0] for r in rows if r[1] is None])
            by_key = {r[1]: r[0] for r in rows if r[1] is not None}
            missing: list[int] = []
            for i in pending:
                if keys[i] is None:
                    ids[i] = next(keyless)
                elif keys[i] in by_key:
                    ids[i] = by_key[keys[i]]
                else:
                    missing.append(i)
            if not missing:
                break
            wanted = sorted({k for i in missing if (k := keys[i]) is not None})
            cur = await conn.execute(
                self._sql["active_by_dedupe_key"], {"queue": params["queue"], "keys": wanted}
            )
            held = {r[1]: r[0] for r in await cur.fetchall()}
            pending = []
            for i in missing:
                if keys[i] in held:
                    ids[i] = held[keys[i]]
                else:  # the holder finished between the two statements: insert again
                    pending.append(i)
            if not pending:
                break
        if any(i is None for i in ids):
            raise RuntimeError("could not resolve dedupe keys under heavy contention; retry")
        return [i for i in ids if i is not None]

    # -- inspecting and operating ------------------------------------------------
    async def get(self, job_id: int) -> Job | None:
        """The job with this id, or ``None``."""
        async with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(self._sql["get"], {"id": int(job_id)})
            row = await cur.fetchone()
        return Job.from_row(row) if row else None

    async def stats(self, queue: str | None = None) -> dict[str, int]:
        """A count for every ``JobStatus`` value (zeros included), for one queue or all."""
        counts = {status.value: 0 for status in JobStatus}
        async with self.connection() as conn:
            cur = await conn.execute(self._sql["stats"], {"queue": queue})
            for status, n in await cur.fetchall():
                counts[status] = int(n)
        return counts

    async def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[Job]:
        """Dead jobs, newest first, with payload, stage, state and error history."""
        async with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(self._sql["dead_letters"], {"queue": queue, "limit": int(limit)})
            return [Job.from_row(row) for row in await cur.fetchall()]

    async def requeue(self, job_ids: int | Sequence[int]) -> int:
        """Move dead jobs back to ``queued`` with fresh attempts; returns how many moved.

        Jobs that are not dead are left alone and not counted.
        """
        ids = [int(job_ids)] if isinstance(job_ids, int) else [int(i) for i in job_ids]
        if not ids:
            return 0
        async with self.connection() as conn:
            cur = await conn.execute(self._sql["requeue"], {"ids": ids, "channel": self.channel})
            return len(await cur.fetchall())

    async def cancel(self, job_id: int) -> bool:
        """Cancel a queued job; ``False`` if it is not queued (running or finished)."""
        async with self.connection() as conn:
            cur = await conn.execute(self._sql["cancel"], {"id": int(job_id)})
            return await cur.fetchone() is not None

    # -- the worker protocol -------------------------------------------------------
    async def claim(
        self,
        owner: str,
        limit: int,
        *,
        lease_seconds: float,
        queue: str | None = None,
        connection: AsyncConnection[Any] | None = None,
    ) -> list[Job]:
        """Claim up to ``limit`` ready jobs for ``owner`` under a lease; each comes back
        with a fresh ``lease_token`` that fences every later write of this run."""
        async with self.connection(connection) as conn:
            cur = await conn.execute(
                self._sql["claim"],
                {
                    "queue": self._queue_name(queue),
                    "limit": int(limit),
                    "owner": owner,
                    "lease": float(lease_seconds),
                },
            )
            return [Job.from_claim(row) for row in await cur.fetchall()]

    async def heartbeat(
        self, leases: Iterable[tuple[int, str]], *, lease_seconds: float
    ) -> set[str]:
        """Renew the leases ``(job id, lease token)``; returns the tokens still held."""
        pairs = list(leases)
        if not pairs:
            return set()
        async with self.connection() as conn:
            cur = await conn.execute(
                self._sql["heartbeat"],
                {
                    "ids": [job_id for job_id, _ in pairs],
                    "tokens": [token for _, token in pairs],
                    "lease": float(lease_seconds),
                },
            )
            return {r[0] for r in await cur.fetchall()}

    async def finish(
        self,
        outcomes: Sequence[Outcome],
        *,
        connection: AsyncConnection[Any] | None = None,
    ) -> set[str]:
        """Write a batch of outcomes, each fenced by its run's lease token; returns the
        tokens whose outcome was written.

        A token missing from the result lost its lease (the job was rescued, maybe
        claimed again): its outcome was rejected. At most one outcome per token.
        """
        if not outcomes:
            return set()
        params = {"outcomes": outcomes_json(outcomes), "keep_errors": MAX_ERROR_RECORDS}
        async with self.connection(connection) as conn:
            cur = await conn.execute(self._sql["finish"], params)
            written = {r[0] for r in await cur.fetchall()}
            if any(o.token in written and _wakes(o) for o in outcomes):
                await conn.execute(
                    self._sql["notify"], {"channel": self.channel, "queue": self.config.queue.name}
                )
        return written

    async def rescue(self, limit: int = 1000) -> int:
        """Return jobs whose lease expired (their worker died or hung) to queued, or to
        dead when their attempts are spent; returns how many moved. Any queue of the
        schema; workers call it periodically, operators may call it any time."""
        return len(await self.rescue_expired(limit))

    async def rescue_expired(self, limit: int = 1000) -> list[tuple[int, str, JobStatus]]:
        """``rescue``, returning ``(job id, queue, new status)`` of each job moved."""
        async with self.connection() as conn:
            cur = await conn.execute(
                self._sql["rescue"], {"limit": int(limit), "keep_errors": MAX_ERROR_RECORDS}
            )
            rows = [(r[0], r[1], JobStatus(r[2])) for r in await cur.fetchall()]
            for queue in sorted({q for _, q, s in rows if s is JobStatus.QUEUED}):
                await conn.execute(self._sql["notify"], {"channel": self.channel, "queue": queue})
        return rows

    async def next_run_at(self, queue: str | None = None) -> datetime | None:
        """When the earliest queued job of ``queue`` becomes ready."""
        async with self.connection() as conn:
            cur = await conn.execute(self._sql["next_run_at"], {"queue": self._queue_name(queue)})
            row = await cur.fetchone()
        return row[0] if row else None

    async def prune(
        self,
        *,
        retention_seconds: float | None,
        dead_retention_seconds: float | None = None,
        limit: int = 5000,
    ) -> int:
        """Delete up to ``limit`` finished jobs older than the retention ages."""
        if retention_seconds is None and dead_retention_seconds is None:
            return 0
        async with self.connection() as conn:
            cur = await conn.execute(
                self._sql["prune"],
                {
                    "schema": self.schema,
                    "retention": retention_seconds,
                    "dead_retention": dead_retention_seconds,
                    "limit": int(limit),
                },
            )
            return cur.rowcount

    async def depth(self, queue: str | None = None) -> dict[str, float]:
        """Ready, scheduled and running counts and the oldest ready job's age (s)."""
        async with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(self._sql["depth"], {"queue": self._queue_name(queue)})
            row = await cur.fetchone()
        assert row is not None
        return {key: float(value or 0) for key, value in row.items()}

    async def stage_counts(self, queue: str | None = None) -> list[tuple[str, str, int]]:
        """``(status, last completed stage or "-", count)`` rows, for operators."""
        async with self.connection() as conn:
            cur = await conn.execute(self._sql["stage_counts"], {"queue": queue})
            return [(r[0], r[1], int(r[2])) for r in await cur.fetchall()]

    async def table_health(self) -> dict[str, Any]:
        """Dead tuples on the jobs table and the oldest snapshot holding back vacuum."""
        async with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(self._sql["table_health"], {"schema": self.schema})
            row = await cur.fetchone()
        return dict(row) if row else {}

    async def vacuum(self, *, min_dead_rows: int = 0) -> int | None:
        """VACUUM the jobs table when it has at least ``min_dead_rows`` dead rows.

        Returns the dead rows it started from, or None when it did not vacuum (too
        few dead rows, or another session is vacuuming the table: ``SKIP_LOCKED``
        makes it one VACUUM at a time across the fleet without a lock of ours, so
        it also works through PgBouncer's transaction pooling). Raises
        ``PermissionError`` when this role does not own the table.
        """
        async with self.connection() as conn:
            cur = await conn.execute(self._sql["vacuum_check"], {"schema": self.schema})
            row = await cur.fetchone()
            if row is None:
                return None  # no statistics yet
            dead_rows, may_vacuum = int(row[0] or 0), bool(row[1])
            if dead_rows < min_dead_rows:
                return None
            if not may_vacuum:
                raise PermissionError(
                    f"this role may not VACUUM {self.schema}.jobs (it is not the table's owner)"
                )
            skipped = False

            def on_notice(diag: Any) -> None:
                nonlocal skipped
                skipped = skipped or diag.sqlstate == "55P03"  # lock_not_available

            conn.add_notice_handler(on_notice)
            try:
                await conn.execute(
                    sql.SQL("VACUUM (SKIP_LOCKED) {}.jobs").format(sql.Identifier(self.schema)),
                    prepare=False,
                )
            finally:
                conn.remove_notice_handler(on_notice)
        return None if skipped else dead_rows

    def _queue_name(self, queue: str | None) -> str:
        name = self.config.queue.name if queue is None else queue
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise ValueError(f"queue name {name!r} must be a non-blank string of at most 200 chars")
        if any(ord(c) < 32 for c in name):
            raise ValueError(f"queue name {name!r} must not contain control characters")
        return name


def outcomes_json(outcomes: Sequence[Outcome]) -> str:
    """The ``finish`` batch as one JSON array of objects (the fields of ``Outcome``).

    State and error are JSON texts already, so they are spliced in rather than parsed
    and serialised again; tokens (uuid text), events and the few stage names are
    quoted without a ``json.dumps`` call per outcome: this runs once per job.
    Raises ``ValueError`` for a delay that is not finite.
    """
    rows = []
    for o in outcomes:
        delay = o.delay
        if delay is None:
            seconds = "null"
        elif math.isfinite(delay):
            seconds = repr(float(delay))
        else:
            raise ValueError(f"job {o.job_id}: outcome delay must be finite, got {delay!r}")
        token = o.token
        if '"' in token or "\\" in token or not token.isprintable():
            token = json.dumps(token)[1:-1]
        rows.append(
            f'{{"id":{int(o.job_id):d},"token":"{token}","event":{_EVENT_JSON[o.event]},'
            f'"stage":{_json_text(o.stage)},"state":{o.state or "null"},'
            f'"delay":{seconds},"error":{o.error or "null"}}}'
        )
    return f"[{','.join(rows)}]"


_EVENT_JSON = {event: json.dumps(event.value) for event in Transition}
_TEXTS: dict[str | None, str] = {}


def _json_text(text: str | None) -> str:
    """``json.dumps(text)``, remembered for the few distinct stage names a worker has."""
    done = _TEXTS.get(text)
    if done is None:
        done = json.dumps(text)
        if len(_TEXTS) < 1024:
            _TEXTS[text] = done
    return done


def _wakes(outcome: Outcome) -> bool:
    """A queued job ready now: idle workers should hear of it."""
    to = TRANSITIONS.get((JobStatus.RUNNING, outcome.event))
    return to is JobStatus.QUEUED and not outcome.delay


def _transitions() -> sql.Composable:
    """The rows of ``jobs.TRANSITIONS`` a run may write (``RUN_EVENTS``) as a VALUES
    list: (from, event, to, refund, deferral)."""
    rows = [
        sql.SQL("({}, {}, {}, {}, {})").format(
            sql.Literal(source.value),
            sql.Literal(event.value),
            sql.Literal(target.value),
            sql.Literal(int(event in REFUNDED)),
            sql.Literal(int(event in DEFERRED)),
        )
        for (source, event), target in TRANSITIONS.items()
        if event in RUN_EVENTS
    ]
    return sql.SQL("(VALUES {})").format(sql.SQL(", ").join(rows))


def _column(values: Sequence[Any] | None, n: int, name: str) -> list[Any]:
    if values is None:
        return [None] * n
    column = list(values)
    if len(column) != n:
        raise ValueError(f"{name} has {len(column)} items for {n} payloads")
    return column


def _int_param(value: int, name: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not -(2**31) <= value < 2**31:
        raise ValueError(f"{name}={value} is out of range")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _run_at_params(run_at: datetime | timedelta | float | None) -> dict[str, Any]:
    if run_at is None:
        return {"run_at": None, "delay": None}
    if isinstance(run_at, datetime):
        if run_at.tzinfo is None:
            raise ValueError("run_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
        return {"run_at": run_at, "delay": None}
    if isinstance(run_at, timedelta):
        return {"run_at": None, "delay": run_at.total_seconds()}
    if isinstance(run_at, int | float) and not isinstance(run_at, bool):
        return {"run_at": None, "delay": float(run_at)}
    raise TypeError("run_at must be a datetime, a timedelta or seconds from now")
