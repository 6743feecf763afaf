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
import hashlib
import json
import math
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

from . import _inputs, _tracing
from ._connect import behind_pooler, open_pool
from ._queue_console import ConsoleMethods
from ._statements import Plan, Statement, Statements, drive_step, own_transaction
from ._waiter import Waiter
from .config import DAY, WorkerConfig
from .jobs import Job, JobStatus, Transition, check_label
from .logs import StructuredLogger
from .outcomes import MAX_ERROR_RECORDS, Outcome
from .sql import migrations, render

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

__all__ = [
    "Outcome",
    "Queue",
    "behind_pooler",
    "breaker_channel_name",
    "channel_name",
    "control_channel_name",
    "done_channel_name",
    "open_pool",
    "outcomes_json",
]

T = TypeVar("T")

#: A table of fewer pages (blocks, 8 KiB by default) is not analyzed for growth: a
#: statement reading it whole costs well under a millisecond, less than what an
#: ANALYZE and every session planning again cost the others while they run.
ANALYZE_MIN_PAGES = 128
#: The columns ``analyze`` reads: those claims filter and sort on (the jsonb
#: columns' statistics would cost most of the time of a whole-table ANALYZE).
_ANALYZED_COLUMNS = ("queue", "status", "kind", "priority", "run_at")
#: The statuses ``wait`` returns at.
_ENDED = frozenset({JobStatus.SUCCEEDED, JobStatus.DEAD, JobStatus.CANCELLED})


def _channel(schema: str, suffix: str, short: str) -> str:
    """``worker_core_<schema><suffix>``, or a hash of the schema when that is longer
    than PostgreSQL's 63-byte identifiers (the names are part of the wire protocol
    between releases: never change them)."""
    name = f"worker_core_{schema}{suffix}"
    if len(name) > 63:
        name = f"worker_core_{short}" + hashlib.sha1(schema.encode()).hexdigest()
    return name


def channel_name(schema: str) -> str:
    """The LISTEN/NOTIFY channel of a schema (payload: the queue name)."""
    return _channel(schema, "", "")


def breaker_channel_name(schema: str) -> str:
    """The channel on which a fleet breaker trip is announced (payload: its name)."""
    return _channel(schema, "_breakers", "b_")


def control_channel_name(schema: str) -> str:
    """The channel of operator commands to workers: JSON ``{"op": "cancel", "id": n}``,
    ``{"op": "pause" | "resume", "queue": name}``."""
    return _channel(schema, "_control", "c_")


def done_channel_name(schema: str) -> str:
    """The channel on which a waited-for job's end is announced (payload: its id)."""
    return _channel(schema, "_done", "d_")


class Queue(ConsoleMethods):
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
        self._statements = Statements(config)
        self._sql = self._statements.sql

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
        return max(await self.applied_versions(), default=0)

    async def applied_versions(self) -> set[int]:
        """The migrations applied to this schema (empty when it is not installed)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL",
                (f"{sql.Identifier(self.schema).as_string(None)}.schema_migrations",),
            )
            row = await cur.fetchone()
            if not row or not row[0]:
                return set()
            cur = await conn.execute(self._sql["applied_migrations"])
            return {int(r[0]) for r in await cur.fetchall()}

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
        connection: AsyncConnection[Any] | None,
        **kwargs: Any,
    ) -> list[int]:
        with _tracing.producer(self._statements, payloads, kwargs) as span:
            plan = self._statements.enqueue(payloads, state=span.state, **kwargs)
            ids = await self._run(plan, connection)
            span.sent(ids)
            return ids

    async def _run(self, plan: Plan[T], connection: AsyncConnection[Any] | None = None) -> T:
        """Drive ``plan`` on ``connection`` (or a pooled one). The arguments were checked
        when the plan was made; its first statement is built before a connection is
        taken, so a plan with nothing to do takes none."""
        statement = drive_step(plan, None)
        if statement is None:
            return cast(T, plan.result)
        async with self.connection(connection) as conn:
            if plan.atomic and own_transaction(conn):
                async with conn.transaction():
                    return await _drive(conn, plan, statement)
            return await _drive(conn, plan, statement)

    async def jobs_by_dedupe_key(
        self,
        keys: Sequence[str],
        *,
        queue: str | None = None,
        connection: AsyncConnection[Any] | None = None,
    ) -> dict[str, int]:
        """``{dedupe_key: id}`` of the newest job of ``queue`` holding each key, in any
        status (finished jobs too, until retention removes them)."""
        wanted = sorted(
            {
                _inputs.text_param(k, "dedupe_key", max_bytes=_inputs.MAX_DEDUPE_KEY_BYTES)
                for k in keys
            }
        )
        if not wanted:
            return {}
        params = {"queue": self._queue_name(queue), "keys": wanted}
        async with self.connection(connection) as conn:
            cur = await conn.execute(self._sql["jobs_by_dedupe_key"], params)
            return {row[0]: row[1] for row in await cur.fetchall()}

    # -- inspecting and operating ------------------------------------------------
    async def get(self, job_id: int) -> Job | None:
        """The job with this id, or ``None``."""
        return await self._run(self._statements.get(job_id))

    async def stats(self, queue: str | None = None) -> dict[str, int]:
        """A count for every ``JobStatus`` value (zeros included), for one queue or all."""
        return await self._run(self._statements.stats(queue))

    async def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[Job]:
        """Dead jobs, newest first, with payload, stage, state and error history."""
        return await self._run(self._statements.dead_letters(queue, limit))

    async def requeue(self, job_ids: int | Sequence[int]) -> int:
        """Move dead jobs back to ``queued`` with fresh attempts; returns how many moved.

        Jobs that are not dead are left alone and not counted.
        """
        return await self._run(self._statements.requeue(job_ids))

    async def cancel(self, job_id: int) -> bool:
        """Cancel a queued job, or ask the worker running it to stop it; ``False`` if the
        job is finished or unknown.

        A running job ends ``cancelled`` once its worker stopped the run (at the
        stage's next await, within moments), or at rescue if that worker died.
        """
        return await self._run(self._statements.cancel(job_id))

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
        job_id = _inputs.job_id(job_id)
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
        limit = _inputs.int_param(limit, "limit", minimum=0)
        wanted = sorted(set(self._queue_names(queue)))  # the lock order of running_room
        room = [
            limit
            if rooms is None
            else min(_inputs.int_param(rooms.get(n, 0), "room", minimum=0), limit)
            for n in wanted
        ]
        caps = [self.config.queue.cap(n) for n in wanted]
        params: dict[str, Any]
        if kinds is None and len(wanted) == 1 and caps[0] is None:
            # The common case has a statement of its own, as cheap as a claim can be.
            params = {
                "queue": wanted[0],
                "limit": min(limit, room[0]),
                "owner": owner,
                "lease": _lease(lease_seconds),
            }
            name = "claim_one"
        else:
            params = {
                "queues": wanted,
                "rooms": room,
                "caps": caps,
                "limit": limit,
                "owner": owner,
                "lease": _lease(lease_seconds),
            }
            name = "claim"
        if kinds is not None:
            params["kinds"] = sorted({check_label(k, "kind") for k in kinds})
            name = "claim_kinds"
        async with self.connection(connection) as conn:
            cur = await conn.execute(self._sql[name], params)
            jobs = [Job.from_claim(row, owner) for row in await cur.fetchall()]
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
                    "lease": _lease(lease_seconds),
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
        # Most batches are successes only: a statement without the transition table.
        plain = all(o.event is _SUCCEED and o.error is None and o.delay is None for o in outcomes)
        async with self.connection(connection) as conn:
            cur = await conn.execute(self._sql["finish_succeeded" if plain else "finish"], params)
            return {r[0]: _STATUS[r[1]] for r in await cur.fetchall()}

    async def rescue(self, limit: int = 1000) -> int:
        """Return jobs whose lease expired (their worker died or hung) to queued, or to
        dead when their attempts are spent; returns how many moved. Any queue of the
        schema; workers call it periodically, operators may call it any time."""
        return len(await self.rescue_expired(limit))

    async def rescue_expired(self, limit: int = 1000) -> list[tuple[int, str, JobStatus]]:
        """``rescue``, returning ``(job id, queue, new status)`` of each job moved."""
        return await self._run(self._statements.rescue(limit))

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
                    "retention": _retention(retention_seconds, "retention_seconds"),
                    "dead_retention": _retention(dead_retention_seconds, "dead_retention_seconds"),
                    "limit": _inputs.int_param(limit, "limit", minimum=0),
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
        done = await self._look_after_table(min_dead_rows=min_dead_rows, growth=None)
        return None if done is None else done[1]

    async def table_pages(self) -> tuple[int, int]:
        """The jobs table's size in pages (blocks) now, and as of its last VACUUM or
        ANALYZE (``pg_class.relpages``, 0 if never)."""
        async with self.connection() as conn:
            check = await self._table_check(conn)
        return (0, 0) if check is None else (check[2], check[3])

    async def analyze(
        self, *, growth: float = 2.0, min_pages: int = ANALYZE_MIN_PAGES
    ) -> int | None:
        """ANALYZE the columns of the jobs table that claims filter and sort on, once
        the table is ``growth`` times the pages it had at its last VACUUM or ANALYZE
        and at least ``min_pages`` (``growth=1, min_pages=0``: now).

        Why: each connection caches the plans of its claim, heartbeat and outcome
        statements (prepared, then generic plans), made for the size the table had
        then. Made on a near-empty table they read the table whole, and keep doing
        so as it grows: every outcome batch then costs a scan of every row. A
        change of the table's recorded size (``relpages``, which VACUUM and ANALYZE
        set) makes every session of every process plan again at its next run, so
        ``relpages`` is also the smallest size any cached plan was made for; ANALYZE
        sets it to the size now. Autovacuum would too, but it looks at the table at
        most once per ``autovacuum_naptime`` (1 minute by default). Workers call
        this every ``maintenance.vacuum_check_interval``. The payload, state and
        errors columns are left out: their statistics cost most of a whole-table
        ANALYZE, and no worker statement filters on them.

        Returns the table's pages when it analyzed it; None when it did not (not
        grown enough, or another session holds the table for a VACUUM, ANALYZE or
        index rebuild: ``SKIP_LOCKED``). Raises ``PermissionError`` when this role
        does not own the table.
        """
        done = await self._look_after_table(min_dead_rows=None, growth=growth, min_pages=min_pages)
        return None if done is None else done[1]

    async def _look_after_table(
        self, *, min_dead_rows: int | None, growth: float | None, min_pages: int = ANALYZE_MIN_PAGES
    ) -> tuple[Literal["VACUUM", "ANALYZE"], int] | None:
        """``vacuum`` if it is due, else ``analyze`` if it is due (None: not asked),
        from one look at the table; returns what ran, with the dead rows it started
        from or the pages it analyzed, or None when nothing ran."""
        if growth is not None and not (1 <= growth <= 1e6 and min_pages >= 0):  # refuses NaN
            raise ValueError(
                f"growth must be in [1, 1e6] and min_pages >= 0, not {growth!r}, {min_pages!r}"
            )
        async with self.connection() as conn:
            check = await self._table_check(conn)
            if check is None:
                return None  # no statistics row: the table is not there (yet)
            dead_rows, may_maintain, pages, stats_pages = check
            command: Literal["VACUUM", "ANALYZE"]
            columns: tuple[str, ...]
            if min_dead_rows is not None and dead_rows >= min_dead_rows:
                command, found, columns = "VACUUM", dead_rows, ()
            elif growth is not None and pages >= max(min_pages, growth * stats_pages):
                command, found, columns = "ANALYZE", pages, _ANALYZED_COLUMNS
            else:
                return None
            if not may_maintain:
                raise PermissionError(
                    f"this role may not {command} {self.schema}.jobs (it is not the table's owner)"
                )
            skipped = await self._skip_locked(conn, command, columns)
        return None if skipped else (command, found)

    async def _table_check(self, conn: AsyncConnection[Any]) -> tuple[int, bool, int, int] | None:
        """The jobs table's dead rows, whether this role may VACUUM or ANALYZE it, its
        pages now and as of its last VACUUM or ANALYZE (None: no statistics row)."""
        cur = await conn.execute(self._sql["vacuum_check"], {"schema": self.schema})
        row = await cur.fetchone()
        if row is None:
            return None
        return int(row[0] or 0), bool(row[1]), int(row[2]), int(row[3])

    async def _skip_locked(
        self,
        conn: AsyncConnection[Any],
        command: Literal["VACUUM", "ANALYZE"],
        columns: Sequence[str] = (),
    ) -> bool:
        """Run ``command`` (VACUUM or ANALYZE) on the jobs table (these ``columns``
        only, if any) with SKIP_LOCKED; True when the server skipped it (another
        session holds the table)."""
        skipped = False

        def on_notice(diag: Any) -> None:
            nonlocal skipped
            skipped = skipped or diag.sqlstate == "55P03"  # lock_not_available

        conn.add_notice_handler(on_notice)
        try:
            statement = sql.SQL("{} (SKIP_LOCKED) {}.jobs").format(
                sql.SQL(command), sql.Identifier(self.schema)
            )
            if columns:
                listed = sql.SQL(", ").join(map(sql.Identifier, columns))
                statement = sql.SQL("{} ({})").format(statement, listed)
            await conn.execute(statement, prepare=False)
        finally:
            conn.remove_notice_handler(on_notice)
        return skipped

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
        return self._statements.queue_name(queue)


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
#: JobStatus by value: a dict lookup per finished job instead of an Enum call.
_STATUS = {status.value: status for status in JobStatus}
_SUCCEED = Transition.SUCCEED
_TEXTS: dict[str | None, str] = {}


def _json_text(text: str | None) -> str:
    """``json.dumps(text)``, remembered for the few distinct stage names a worker has."""
    done = _TEXTS.get(text)
    if done is None:
        done = json.dumps(text)
        if len(_TEXTS) < 1024:
            _TEXTS[text] = done
    return done


def _claim_order(job: Job) -> tuple[int, datetime, int]:
    assert job.run_at is not None  # every claimed row has one
    return (-job.priority, job.run_at, job.id)


async def _drive(conn: AsyncConnection[Any], plan: Plan[T], statement: Statement | None) -> T:
    while statement is not None:
        if statement.dict_rows:
            cur: Any = conn.cursor(row_factory=dict_row)
            await cur.execute(statement.query, statement.params)
        else:
            cur = await conn.execute(statement.query, statement.params)
        rows = await cur.fetchall() if cur.description is not None else []
        statement = drive_step(plan, rows)
    return cast(T, plan.result)


def _lease(seconds: float) -> float:
    # An infinite lease is stored as 'infinity', and the claimed row can then not be
    # read back: every claimed job would be stranded as running. A negative lease is
    # one that is already over (rescue tests claim that way).
    return _inputs.float_param(seconds, "lease_seconds", minimum=-DAY, maximum=DAY)


def _retention(seconds: float | None, name: str) -> float | None:
    if seconds is None:
        return None
    return _inputs.float_param(seconds, name, minimum=0.0, maximum=_inputs.MAX_RUN_AT_SECONDS)
