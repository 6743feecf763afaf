"""Queue: the producer's and operator's handle, and the only module that runs queue SQL.

Producers ``enqueue``; operators ``get``, ``stats``, ``dead_letters``, ``requeue``,
``cancel`` and ``rescue``; ``migrate`` installs or upgrades the schema. The worker
protocol methods (``claim``, ``heartbeat``, ``finish``, ``rescue_expired``,
``prune``) are what ``BaseWorker`` drives; they are public so other runtimes can
drive them too. Every claim hands out a lease token; ``heartbeat`` and ``finish``
are fenced by it (see ``worker_core.outcomes``).
"""

from __future__ import annotations

import asyncio
import functools
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

from ._waiter import Waiter
from .config import WorkerConfig
from .jobs import (
    DEFERRED,
    REFUNDED,
    RUN_EVENTS,
    TRANSITIONS,
    Job,
    JobStatus,
    check_label,
    dump_json,
    dump_json_objects,
    effective_event,
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
    "control_channel_name",
    "done_channel_name",
    "open_pool",
    "outcomes_json",
]

#: The statuses ``wait`` returns at.
_ENDED = frozenset({JobStatus.SUCCEEDED, JobStatus.DEAD, JobStatus.CANCELLED})

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


def control_channel_name(schema: str) -> str:
    """The channel of operator commands to workers: JSON ``{"op": "cancel", "id": n}``,
    ``{"op": "pause" | "resume", "queue": name}``."""
    name = f"worker_core_{schema}_control"
    if len(name) > 63:
        name = "worker_core_c_" + hashlib.sha1(schema.encode()).hexdigest()
    return name


def done_channel_name(schema: str) -> str:
    """The channel on which a waited-for job's end is announced (payload: its id)."""
    name = f"worker_core_{schema}_done"
    if len(name) > 63:
        name = "worker_core_d_" + hashlib.sha1(schema.encode()).hexdigest()
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
        self.control_channel = control_channel_name(self.schema)
        self.done_channel = done_channel_name(self.schema)
        self._waiter: Waiter | None = None
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
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            await waiter.close()
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
        kind: str = "default",
    ) -> int:
        """Add one job; returns its id.

        With ``connection=`` the insert joins the caller's transaction (the job
        exists, and workers are woken, only if it commits). A ``dedupe_key`` held
        by a queued or running job of the same queue returns that job's id.
        ``run_at`` is an aware datetime, a timedelta or seconds from now. ``kind``
        says which pipeline runs the job (``"default"`` unless given).
        """
        ids = await self._enqueue(
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
        kind: str = "default",
    ) -> list[int]:
        """Add many jobs with one statement per ``queue.enqueue_batch_size`` rows.

        Returns the ids in input order. Several batches run in one transaction, so
        either every job is added or none is. Every job gets the same ``kind``.
        """
        return await self._enqueue(
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
        kind: str = "default",
    ) -> list[int]:
        n = len(payloads)
        queue_name = self._queue_name(queue)
        keys = _column(dedupe_keys, n, "dedupe_keys")
        cids = _column(correlation_ids, n, "correlation_ids")
        batches = self._payload_batches(payloads, label) if n else []
        params: dict[str, Any] = {
            "queue": queue_name,
            "kind": check_label(kind, "kind"),
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
        """Cancel a queued job, or ask the worker running it to stop it; ``False`` if the
        job is finished or unknown.

        A running job ends ``cancelled`` once its worker stopped the run (at the
        stage's next await, within moments), or at rescue if that worker died.
        """
        params = {"id": int(job_id), "control": self.control_channel, "done": self.done_channel}
        async with self.connection() as conn:
            cur = await conn.execute(self._sql["cancel"], params)
            return await cur.fetchone() is not None

    async def wait(self, job_id: int, timeout: float | None = None) -> Job:
        """Wait until the job is succeeded, dead or cancelled, and return it.

        A NOTIFY announces the job's end (the first wait opens this Queue's LISTEN
        connection), so nothing polls while it runs; should that connection fail, the
        job is read again every ``queue.poll_interval``. Several waits, for one or many
        jobs, share the connection.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
            LookupError: no job has this id.
        """
        if timeout is not None and not (isinstance(timeout, int | float) and timeout >= 0):
            raise ValueError(f"timeout must be None or a number of seconds >= 0, not {timeout!r}")
        if timeout is not None and not math.isfinite(timeout):
            timeout = None
        job_id = int(job_id)
        if self._waiter is None:
            self._waiter = Waiter(self.config, self.done_channel)
        waiter = self._waiter
        try:
            async with asyncio.timeout(timeout):
                with waiter.watch(job_id) as woken:
                    await waiter.listening()
                    async with self.connection() as conn:
                        # Marked after LISTEN is up, read after the mark: a job that ends
                        # later is announced; one that ended before is read here.
                        await conn.execute(self._sql["wait_for"], {"id": job_id})
                    woken.clear()  # what woke it so far, the read below sees
                    while True:
                        job = await self.get(job_id)
                        if job is None:
                            raise LookupError(f"job {job_id} does not exist")
                        if job.status in _ENDED:
                            return job
                        await waiter.until(woken, self.config.queue.poll_interval)
        except TimeoutError:
            raise TimeoutError(f"job {job_id} did not finish within {timeout}s") from None

    # -- the worker protocol -------------------------------------------------------
    async def claim(
        self,
        owner: str,
        limit: int,
        *,
        lease_seconds: float,
        queue: str | Sequence[str] | None = None,
        kinds: Sequence[str] | None = None,
        rooms: Mapping[str, int] | None = None,
        connection: AsyncConnection[Any] | None = None,
    ) -> list[Job]:
        """Claim up to ``limit`` ready jobs for ``owner`` under a lease; each comes back
        with a fresh ``lease_token`` that fences every later write of this run.

        Args:
            queue: one queue or several (default: every queue of ``config.queue.name``);
                the best jobs across them come first (priority, then run_at). Paused
                queues give none; ``config.queue.max_running`` caps each queue fleet-wide.
            kinds: claim only jobs of these kinds (None: any kind).
            rooms: at most this many jobs of a queue (default: ``limit``).
        """
        limit = int(limit)
        wanted = sorted(set(self._queue_names(queue)))  # the lock order of running_room
        room = [limit if rooms is None else min(int(rooms.get(n, 0)), limit) for n in wanted]
        params: dict[str, Any] = {
            "queues": wanted,
            "rooms": room,
            "caps": [self.config.queue.cap(n) for n in wanted],
            "limit": limit,
            "owner": owner,
            "lease": float(lease_seconds),
        }
        name = "claim"
        if kinds is not None:
            params["kinds"] = sorted({check_label(k, "kind") for k in kinds})
            name = "claim_kinds"
        async with self.connection(connection) as conn:
            cur = await conn.execute(self._sql[name], params)
            jobs = [Job.from_claim(row) for row in await cur.fetchall()]
        # RETURNING follows the join, not the pick: put the best first again.
        jobs.sort(key=_claim_order)
        return jobs

    async def heartbeat(
        self, leases: Iterable[tuple[int, str]], *, lease_seconds: float
    ) -> set[str]:
        """Renew the leases ``(job id, lease token)``; returns the tokens still held."""
        return set(await self.renew_leases(leases, lease_seconds=lease_seconds))

    async def renew_leases(
        self, leases: Iterable[tuple[int, str]], *, lease_seconds: float
    ) -> dict[str, bool]:
        """``heartbeat``, saying for each token still held whether an operator asked to
        cancel its job (the fallback when the cancel NOTIFY was missed)."""
        pairs = list(leases)
        if not pairs:
            return {}
        async with self.connection() as conn:
            cur = await conn.execute(
                self._sql["heartbeat"],
                {
                    "ids": [job_id for job_id, _ in pairs],
                    "tokens": [token for _, token in pairs],
                    "lease": float(lease_seconds),
                },
            )
            return {r[0]: bool(r[1]) for r in await cur.fetchall()}

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
        return set(await self.finish_statuses(outcomes, connection=connection))

    async def finish_statuses(
        self,
        outcomes: Sequence[Outcome],
        *,
        connection: AsyncConnection[Any] | None = None,
    ) -> dict[str, JobStatus]:
        """``finish``, returning the new status of each token's job: what the outcome
        asked for, unless a cancel request changed it (``jobs.effective_event``)."""
        if not outcomes:
            return {}
        params = {
            "outcomes": outcomes_json(outcomes),
            "keep_errors": MAX_ERROR_RECORDS,
            "channel": self.channel,
            "done_channel": self.done_channel,
        }
        async with self.connection(connection) as conn:
            cur = await conn.execute(self._sql["finish"], params)
            return {r[0]: JobStatus(r[1]) for r in await cur.fetchall()}

    async def rescue(self, limit: int = 1000) -> int:
        """Return jobs whose lease expired (their worker died or hung) to queued, or to
        dead when their attempts are spent; returns how many moved. Any queue of the
        schema; workers call it periodically, operators may call it any time."""
        return len(await self.rescue_expired(limit))

    async def rescue_expired(self, limit: int = 1000) -> list[tuple[int, str, JobStatus]]:
        """``rescue``, returning ``(job id, queue, new status)`` of each job moved."""
        async with self.connection() as conn:
            cur = await conn.execute(
                self._sql["rescue"],
                {
                    "limit": int(limit),
                    "keep_errors": MAX_ERROR_RECORDS,
                    "done_channel": self.done_channel,
                },
            )
            rows = [(r[0], r[1], JobStatus(r[2])) for r in await cur.fetchall()]
            for queue in sorted({q for _, q, s in rows if s is JobStatus.QUEUED}):
                await conn.execute(self._sql["notify"], {"channel": self.channel, "queue": queue})
        return rows

    async def next_run_at(
        self, queue: str | Sequence[str] | None = None, *, kinds: Sequence[str] | None = None
    ) -> datetime | None:
        """When the earliest queued job of ``queue`` (default: every queue of the
        config) and ``kinds`` (None: any) becomes ready; paused queues have none."""
        params = {
            "queues": self._queue_names(queue),
            "kinds": None if kinds is None else list(kinds),
        }
        async with self.connection() as conn:
            cur = await conn.execute(self._sql["next_run_at"], params)
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

    async def depth(self, queue: str | Sequence[str] | None = None) -> dict[str, float]:
        """Ready, scheduled and running counts and the oldest ready job's age (s), of
        ``queue`` (one name, several, or by default every queue of the config)."""
        async with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(self._sql["depth"], {"queues": self._queue_names(queue)})
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

    def _queue_names(self, queue: str | Sequence[str] | None) -> list[str]:
        """One name, several, or (None) every queue of ``config.queue.name``; checked."""
        if queue is None:
            return list(self.config.queue.names)
        if isinstance(queue, str):
            return [self._queue_name(queue)]
        names = [self._queue_name(n) for n in queue]
        if not names:
            raise ValueError("name at least one queue")
        return names

    def _queue_name(self, queue: str | None) -> str:
        name = self.config.queue.primary if queue is None else queue
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise ValueError(f"queue name {name!r} must be a non-blank string of at most 200 chars")
        if any(ord(c) < 32 for c in name):
            raise ValueError(f"queue name {name!r} must not contain control characters")
        return name

    # -- operations console: queue control, history, workers, alerts, dashboard reads --
    @functools.cached_property
    def _console(self) -> dict[str, bytes]:
        return {
            name: render(text, self.schema, kind=_KIND).as_bytes(None)
            for name, text in load_queries("console.sql").items()
        }

    async def _rows(self, name: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        async with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(self._console[name], params)
            return await cur.fetchall()

    async def _count(self, name: str, params: Mapping[str, Any]) -> int:
        async with self.connection() as conn:
            cur = await conn.execute(self._console[name], params)
            return cur.rowcount

    async def pause(self, queue: str | None = None, *, by: str | None = None) -> bool:
        """Stop every worker claiming ``queue``'s jobs (running jobs finish); persistent.

        Returns False when it was paused already. Listeners get a NOTIFY.
        """
        params = {"queue": self._queue_name(queue), "by": by, "control": self.control_channel}
        return bool(await self._rows("pause", params))

    async def resume(self, queue: str | None = None) -> bool:
        """Let workers claim ``queue`` again and wake them; False when it was not paused."""
        params = {
            "queue": self._queue_name(queue),
            "channel": self.channel,
            "control": self.control_channel,
        }
        return bool(await self._rows("resume", params))

    async def paused(self) -> list[str]:
        """The paused queues of this schema, sorted."""
        return [row["queue"] for row in await self._rows("paused", {})]

    async def history(
        self, minutes: int = 60, queue: str | None = None, *, stages: bool = False
    ) -> list[dict[str, Any]]:
        """Per-minute rollups of the last ``minutes`` minutes, oldest first.

        Each row: ``minute``, ``queue``, ``kind``, ``succeeded``, ``failed``,
        ``retried``, ``deferred``, ``dead_lettered``, ``seconds_sum``, ``buckets``
        (duration counts per ``worker_core.history.BOUNDS``) and ``stage`` (None on
        job-level rows; with ``stages=True`` the per-stage rows come too).
        """
        minutes = _int_param(minutes, "minutes", minimum=1)
        if minutes > 366 * 24 * 60:
            raise ValueError(f"minutes={minutes} is more than a year")
        name = None if queue is None else self._queue_name(queue)
        return await self._rows(
            "history", {"minutes": minutes, "queue": name, "stages": bool(stages)}
        )

    async def record_history(self, rows: Sequence[Sequence[Any]]) -> None:
        """Add rollup rows ``(minute epoch, queue, kind, stage, succeeded, failed,
        retried, deferred, dead_lettered, seconds_sum, buckets)`` in one statement."""
        if rows:
            ordered = sorted(rows, key=lambda r: (r[0], r[1], r[2], r[3]))
            text = json.dumps(ordered, allow_nan=False, separators=(",", ":"))
            await self._count("record_history", {"rows": text})

    async def prune_history(self, retention_days: float, *, limit: int = 10_000) -> int:
        """Delete up to ``limit`` history rows older than ``retention_days``."""
        return await self._count("prune_history", {"days": retention_days, "limit": limit})

    async def register_worker(self, worker: Mapping[str, Any]) -> None:
        """Upsert a workers-registry row (id, host, pid, version, queues, kinds,
        concurrency, in_flight, lease); its ``last_seen`` becomes now."""
        await self._count("register_worker", worker)

    async def leave_worker(self, worker_id: str) -> None:
        """Remove a worker from the registry (graceful stop)."""
        await self._count("leave_worker", {"id": worker_id})

    async def prune_workers(self) -> int:
        """Forget workers gone for more than a day."""
        return await self._count("prune_workers", {})

    async def workers(self) -> list[dict[str, Any]]:
        """The workers registry, live ones first; ``alive`` is False once a worker
        missed its lease (it died or hangs)."""
        return await self._rows("workers", {})

    async def take_lease(self, name: str, owner: str, ttl: float) -> tuple[bool, float]:
        """Take or renew lease ``name`` for ``ttl`` seconds; returns (held, database
        clock as epoch seconds)."""
        if not math.isfinite(ttl) or ttl <= 0:
            raise ValueError(f"lease ttl must be a positive number of seconds, got {ttl!r}")
        rows = await self._rows("take_lease", {"name": name, "owner": owner, "ttl": ttl})
        return rows[0]["owner"] == owner, float(rows[0]["now"])

    async def release_lease(self, name: str, owner: str) -> None:
        await self._count("release_lease", {"name": name, "owner": owner})

    async def alert_states(self) -> list[dict[str, Any]]:
        """Every alert's stored state (alert, subject, status, since, value, threshold,
        notified)."""
        return await self._rows("alert_states", {})

    async def save_alert_states(
        self, owner: str, rows: Sequence[Sequence[Any]], *, lease: str = "alerts"
    ) -> bool:
        """Upsert alert states, only while ``owner`` holds ``lease``; False otherwise."""
        if not rows:
            return True
        text = json.dumps(list(rows), allow_nan=False, separators=(",", ":"))
        params = {"owner": owner, "lease": lease, "rows": text}
        return bool(await self._rows("save_alert_states", params))

    async def prune_alerts(self) -> int:
        return await self._count("prune_alerts", {})

    async def alert_values(
        self, alert: str, *, window: float = 300.0, min_count: int = 1
    ) -> list[tuple[str, float]]:
        """``(subject, value)`` of alert rule ``alert`` now (see sql/console.sql)."""
        if alert not in _ALERT_QUERIES:
            raise ValueError(f"unknown alert rule {alert!r}")
        rows = await self._rows(
            f"alert_{alert}", {"window": float(window), "min_count": int(min_count)}
        )
        return [(row["subject"], float(row["value"])) for row in rows]

    async def firing_alerts(self) -> list[tuple[str, str, float]]:
        """``(alert, subject, 1.0 firing or 0.0)`` for every known alert."""
        rows = await self._rows("firing_alerts", {})
        return [(row["alert"], row["subject"], float(row["firing"])) for row in rows]

    async def discard(self, job_ids: int | Sequence[int]) -> int:
        """Move dead jobs to cancelled (an operator gave up on them); returns how many."""
        ids = [int(job_ids)] if isinstance(job_ids, int) else [int(i) for i in job_ids]
        return len(await self._rows("discard", {"ids": ids})) if ids else 0

    async def overview(self) -> list[dict[str, Any]]:
        """Per queue: a count per status, ready and scheduled, the oldest ready age."""
        return await self._rows("overview", {})

    async def list_jobs(
        self,
        *,
        queue: str | None = None,
        kind: str | None = None,
        status: JobStatus | str | None = None,
        stage: str | None = None,
        search: str | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Jobs newest first, ``limit`` at most, with ids below ``before`` (keyset paging).

        ``search``: a job id, a correlation id, a payload key, or ``key=value`` (the
        key's text value). Payload, state and errors are left out (see ``get``).
        """
        for label, text in (("kind", kind), ("stage", stage), ("search", search)):
            if text is not None and ("\x00" in text or len(text) > 1000):
                raise ValueError(f"{label} must be at most 1000 characters without NUL")
        value: str | None = None
        if search is not None and "=" in search:
            search, value = (part.strip() for part in search.split("=", 1))
        search_id = int(search) if search and search.isascii() and search.isdigit() else None
        params = {
            "queue": None if queue is None else self._queue_name(queue),
            "kind": kind,
            "status": None if status is None else JobStatus(status).value,
            "stage": stage,
            "search": search or None,
            "search_value": value,
            "search_id": search_id if search_id is not None and search_id < 2**63 else None,
            "before": before,
            "limit": _int_param(limit, "limit", minimum=1),
        }
        return await self._rows("list_jobs", params)

    async def fleet_breakers(self) -> list[dict[str, Any]]:
        """The shared circuit breakers: state (closed, open, half_open), failures,
        opened_at, seconds until a probe (``half_open_in``), seconds open."""
        return await self._rows("fleet_breakers", {})


#: The jobs' kind in console queries (the column of migration 0008).
_KIND: sql.Composable = sql.Identifier("kind")
_ALERT_QUERIES = frozenset(
    {
        "dead_letters",
        "oldest_ready_seconds",
        "breaker_open_seconds",
        "no_workers_seconds",
        "failure_ratio",
    }
)


def outcomes_json(outcomes: Sequence[Outcome]) -> str:
    """The ``finish`` batch as one JSON array of objects (the fields of ``Outcome``).

    State and error are JSON texts already, so they are spliced in rather than parsed
    and serialised again. Raises ``ValueError`` for a delay that is not finite.
    """
    dumps = json.dumps
    rows = []
    for o in outcomes:
        if o.delay is None:
            delay = "null"
        elif math.isfinite(o.delay):
            delay = repr(float(o.delay))
        else:
            raise ValueError(f"job {o.job_id}: outcome delay must be finite, got {o.delay!r}")
        rows.append(
            f'{{"id":{int(o.job_id)},"token":{dumps(o.token)},"event":"{o.event.value}",'
            f'"stage":{dumps(o.stage, ensure_ascii=False)},"state":{o.state or "null"},'
            f'"delay":{delay},"error":{o.error or "null"}}}'
        )
    return f"[{','.join(rows)}]"


def _claim_order(job: Job) -> tuple[int, datetime, int]:
    assert job.run_at is not None  # every claimed row has one
    return (-job.priority, job.run_at, job.id)


def _transitions() -> sql.Composable:
    """The rows of ``jobs.TRANSITIONS`` a run may write (``RUN_EVENTS``), once without
    and once with a standing cancel request, as a VALUES list: (from, event,
    cancel_requested, to, refund, deferral); see ``jobs.effective_event``."""
    rows = []
    for event in sorted(RUN_EVENTS):
        for requested in (False, True):
            actual = effective_event(event, requested)
            target = TRANSITIONS[(JobStatus.RUNNING, actual)]
            rows.append(
                sql.SQL("({}, {}, {}, {}, {}, {})").format(
                    sql.Literal(JobStatus.RUNNING.value),
                    sql.Literal(event.value),
                    sql.Literal(requested),
                    sql.Literal(target.value),
                    sql.Literal(int(actual in REFUNDED)),
                    sql.Literal(int(actual in DEFERRED)),
                )
            )
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
