"""One adapter per queue library, shared by the orchestrator (run.py) and the worker
subprocesses (_worker.py). Runs only in the benchmark venv (bench/compare/.venv).

Every adapter works on a database of its own, created empty for each measured run:
``install`` creates the library's schema there, ``producer`` opens what a producer
opens (and is used for bulk and single enqueues), ``verify`` checks afterwards that
every job was really processed, and ``worker`` builds a worker that runs one
``Body`` per job, either until the queue is drained or until told to stop.

Each library is used through its documented public API at its documented best
settings (see docs/benchmarks.md, "Settings"): nothing here reaches into internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

QUEUE = "bench"


# -- connection strings ------------------------------------------------------------
def with_dbname(dsn: str, dbname: str) -> str:
    """``dsn`` (URL or key=value) pointed at another database, as a key=value string."""
    return make_conninfo(dsn, dbname=dbname)


def asyncpg_params(dsn: str) -> dict[str, Any]:
    """asyncpg does not take libpq key=value strings: pass the parts. A ``host`` that is
    a directory is a Unix socket directory (socket ``<dir>/.s.PGSQL.<port>``)."""
    info = conninfo_to_dict(dsn)
    params: dict[str, Any] = {
        "host": info.get("host") or None,
        "port": int(str(info["port"])) if info.get("port") else 5432,
        "user": info.get("user") or None,
        "database": info.get("dbname") or None,
    }
    if info.get("password"):
        params["password"] = info["password"]
    return params


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


# -- what every job does ---------------------------------------------------------------
class Body:
    """The job handler's work, identical for every library: optionally sleep, then
    count the job and (latency runs) record enqueue-to-done time.

    "Done" is when the handler returns (the time is taken at its last line), not when
    the library has written the completion: see docs/benchmarks.md.
    """

    def __init__(self, sleep: float = 0.0, record: bool = False, expect: int = 0) -> None:
        self.sleep = sleep
        self.record = record
        self.expect = expect
        self.count = 0
        self.samples: list[tuple[int, float]] = []
        self.reached = asyncio.Event()

    def done(self, payload: dict[str, Any] | None) -> None:
        if self.record and payload is not None:
            self.samples.append((int(payload["i"]), time.monotonic() - float(payload["t"])))
        self.count += 1
        if self.expect and self.count >= self.expect:
            self.reached.set()


class WorkerRun:
    """A prepared worker: ``drain()`` runs until the queue is empty, ``serve(stop)``
    until ``stop`` is set. ``close()`` releases what ``prepare`` opened."""

    async def drain(self) -> None:
        raise NotImplementedError

    async def serve(self, stop: asyncio.Event) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class Producer:
    async def enqueue_many(self, payloads: list[dict[str, Any]]) -> int:
        raise NotImplementedError

    async def enqueue_one(self, payload: dict[str, Any]) -> None:
        raise NotImplementedError


class Lib:
    key = ""
    label = ""
    venv: str | None = None  # None: the benchmark venv; else bench/compare/.venv-<venv>
    #: Put first on the subprocesses' PYTHONPATH (and run everything in them): another
    #: checkout's worker_core in the benchmark venv. None: this checkout's, in-process.
    pythonpath: str | None = None

    async def install(self, dsn: str) -> None:
        raise NotImplementedError

    def producer(self, dsn: str) -> contextlib.AbstractAsyncContextManager[Producer]:
        raise NotImplementedError

    async def verify(self, dsn: str, expected: int) -> None:
        raise NotImplementedError

    async def worker(self, dsn: str, concurrency: int, processes: int, body: Body) -> WorkerRun:
        raise NotImplementedError

    def settings(self, concurrency: int, processes: int) -> str:
        return ""


async def scalar(dsn: str, query: str) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query)
        row = await cur.fetchone()
        return row[0] if row else None


# -- worker_core -------------------------------------------------------------------------
class WorkerCoreLib(Lib):
    """worker_core: BaseWorker with one stage. ``prefetch`` False = the default
    (claim only for free slots), True = ``queue.prefetch = concurrency``."""

    def __init__(self, prefetch: bool, otel_api: bool = False, base: bool = False) -> None:
        self.prefetch = prefetch
        #: Tracing installed but off: opentelemetry-api importable, no SDK configured.
        #: Without it, the worker process cannot import opentelemetry at all.
        self.otel_api = otel_api
        self.key = "worker_core+prefetch" if prefetch else "worker_core"
        if otel_api:
            self.key += "+otel-api"
        if base:
            # The worker_core of another checkout (WORKER_CORE_BENCH_BASE), measured in
            # the same run as this one: a before/after comparison on one machine state.
            self.key += "@base"
            self.pythonpath = os.environ.get("WORKER_CORE_BENCH_BASE") or None
        self.label = self.key

    def config(self, dsn: str, concurrency: int = 10) -> Any:
        from worker_core import WorkerConfig

        return WorkerConfig.model_validate(
            {
                "database": {"dsn": dsn, "schema": "bench"},
                "queue": {
                    "name": QUEUE,
                    "concurrency": concurrency,
                    "prefetch": concurrency if self.prefetch else 0,
                },
            }
        )

    def settings(self, concurrency: int, processes: int) -> str:
        p = concurrency if self.prefetch else 0
        return f"queue.concurrency={concurrency}, queue.prefetch={p}, other settings default"

    async def install(self, dsn: str) -> None:
        from worker_core import Queue

        async with Queue(self.config(dsn)) as queue:
            await queue.migrate()

    @contextlib.asynccontextmanager
    async def producer(self, dsn: str) -> AsyncIterator[Producer]:
        from worker_core import Queue

        async with Queue(self.config(dsn)) as queue:
            await queue.stats()  # the pool's first connection is open before timing

            class _P(Producer):
                async def enqueue_many(self, payloads: list[dict[str, Any]]) -> int:
                    return len(await queue.enqueue_many(payloads))

                async def enqueue_one(self, payload: dict[str, Any]) -> None:
                    await queue.enqueue(payload)

            yield _P()

    async def verify(self, dsn: str, expected: int) -> None:
        from worker_core import Queue

        async with Queue(self.config(dsn)) as queue:
            stats = await queue.stats()
        if stats.get("succeeded") != expected:
            raise RuntimeError(f"{self.key}: expected {expected} succeeded jobs, found {stats}")

    async def worker(self, dsn: str, concurrency: int, processes: int, body: Body) -> WorkerRun:
        if self.otel_api:
            import opentelemetry.trace  # noqa: F401  (the API alone: tracing off)
        else:
            sys.modules.setdefault("opentelemetry", None)  # type: ignore[arg-type]
        from worker_core import BaseWorker, StageContext

        try:
            from worker_core import _tracing
        except ImportError:  # a worker_core older than tracing (a before/after run)
            if self.otel_api:
                raise
        else:
            if self.otel_api != _tracing.api_installed() or _tracing.enabled():
                raise RuntimeError(f"{self.key}: tracing is not set up as this variant says")

        class BenchStage:
            name = "bench"

            async def run(self, ctx: StageContext) -> None:
                if body.sleep:
                    await asyncio.sleep(body.sleep)
                body.done(ctx.job.payload if body.record else None)

        class BenchWorker(BaseWorker):
            def stages(self) -> list[Any]:
                return [BenchStage()]

        worker = BenchWorker(self.config(dsn, concurrency))

        class _R(WorkerRun):
            async def drain(self) -> None:
                await worker.run(until_empty=True, install_signal_handlers=False)

            async def serve(self, stop: asyncio.Event) -> None:
                task = asyncio.create_task(worker.run(install_signal_handlers=False))
                await _until(stop, task)
                await worker.stop()
                await task

        return _R()


async def _until(stop: asyncio.Event, task: asyncio.Task[Any]) -> None:
    """Wait for ``stop``; a worker task that ends first (it crashed) raises here."""
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
        raise RuntimeError("worker stopped before it was told to")


# -- pgqueuer ------------------------------------------------------------------------------
class PgQueuerLib(Lib):
    """pgqueuer's QueueManager over one connection (its docs: a dedicated connection
    for the QueueManager), schema from ``Queries.install`` plus the recommended
    autovacuum settings (``pgq autovac``), durable tables (the default)."""

    def __init__(self, driver: str) -> None:
        assert driver in ("asyncpg", "psycopg")
        self.driver = driver
        self.key = f"pgqueuer-{driver}"
        self.label = self.key

    async def _connect(self, dsn: str) -> tuple[Any, Callable[[], Awaitable[None]]]:
        if self.driver == "asyncpg":
            import asyncpg
            from pgqueuer.db import AsyncpgDriver

            conn = await asyncpg.connect(**asyncpg_params(dsn))
            return AsyncpgDriver(conn), conn.close
        from pgqueuer.db import PsycopgDriver

        pconn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        return PsycopgDriver(pconn), pconn.close

    @staticmethod
    def run_args(concurrency: int, processes: int) -> tuple[int, int | None, int]:
        """(batch_size, max_concurrent_tasks, entrypoint concurrency_limit).

        ``max_concurrent_tasks`` (per process) must be >= 2 x batch_size, so the batch
        is half the concurrency. Concurrency 1 cannot be expressed that way: it uses
        the entrypoint's fleet-wide ``concurrency_limit`` (1 per process) instead."""
        if concurrency >= 2:
            return max(1, concurrency // 2), concurrency, 0
        return 1, None, processes

    def settings(self, concurrency: int, processes: int) -> str:
        batch, mct, limit = self.run_args(concurrency, processes)
        text = f"batch_size={batch}, max_concurrent_tasks={mct}"
        if limit:
            text += f", entrypoint concurrency_limit={limit} (fleet-wide)"
        return text + ", pgq autovac, durable"

    async def install(self, dsn: str) -> None:
        from pgqueuer import Queries

        driver, close = await self._connect(dsn)
        try:
            queries = Queries(driver)
            await queries.install()
            await queries.optimize_autovacuum()
        finally:
            await close()

    @contextlib.asynccontextmanager
    async def producer(self, dsn: str) -> AsyncIterator[Producer]:
        from pgqueuer import Queries

        driver, close = await self._connect(dsn)
        queries = Queries(driver)
        try:

            class _P(Producer):
                async def enqueue_many(self, payloads: list[dict[str, Any]]) -> int:
                    n = len(payloads)
                    ids = await queries.enqueue([QUEUE] * n, [dumps(p) for p in payloads], [0] * n)
                    return len(ids)

                async def enqueue_one(self, payload: dict[str, Any]) -> None:
                    await queries.enqueue(QUEUE, dumps(payload))

            yield _P()
        finally:
            await close()

    async def verify(self, dsn: str, expected: int) -> None:
        # Finished jobs are deleted from the queue table (and logged): none may be left.
        left = await scalar(dsn, "SELECT count(*) FROM pgqueuer")
        if left != 0:
            raise RuntimeError(f"{self.key}: {left} jobs left in the queue table")

    async def worker(self, dsn: str, concurrency: int, processes: int, body: Body) -> WorkerRun:
        from pgqueuer import Queries, QueueManager
        from pgqueuer.models import Job
        from pgqueuer.types import QueueExecutionMode

        batch, mct, limit = self.run_args(concurrency, processes)
        driver, close = await self._connect(dsn)
        qm = QueueManager(Queries(driver))

        @qm.entrypoint(QUEUE, concurrency_limit=limit)  # type: ignore[untyped-decorator,unused-ignore]
        async def bench(job: Job) -> None:
            if body.sleep:
                await asyncio.sleep(body.sleep)
            body.done(json.loads(job.payload) if body.record and job.payload else None)

        class _R(WorkerRun):
            async def drain(self) -> None:
                await qm.run(
                    batch_size=batch, max_concurrent_tasks=mct, mode=QueueExecutionMode.drain
                )

            async def serve(self, stop: asyncio.Event) -> None:
                task = asyncio.create_task(qm.run(batch_size=batch, max_concurrent_tasks=mct))
                await _until(stop, task)
                qm.shutdown.set()
                await task

            async def close(self) -> None:
                await close()

        return _R()


# -- procrastinate ---------------------------------------------------------------------------
class ProcrastinateLib(Lib):
    """procrastinate's App over its PsycopgConnector (a psycopg pool); worker
    ``concurrency`` = the benchmark's concurrency, other worker options default
    (LISTEN/NOTIFY on, jobs kept)."""

    key = "procrastinate"
    label = "procrastinate"

    @staticmethod
    def pool_size(concurrency: int) -> int:
        # Sub-workers fetch and finish their jobs through the pool, and LISTEN takes
        # one connection. Measured at concurrency 10 and 50: pools of 5, 10, 20 and 52
        # drain within ~8 % of each other, 10 at least as fast as the larger ones.
        return min(concurrency + 2, 10)

    def settings(self, concurrency: int, processes: int) -> str:
        return (
            f"concurrency={concurrency}, pool max_size={self.pool_size(concurrency)}, "
            "listen_notify=True, delete_jobs=never (defaults)"
        )

    def app(self, dsn: str, body: Body | None = None, pool: int = 4) -> tuple[Any, Any]:
        import procrastinate

        app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(
                conninfo=dsn, min_size=min(4, pool), max_size=pool
            )
        )

        @app.task(name="bench", queue=QUEUE)  # type: ignore[untyped-decorator,unused-ignore]
        async def bench(i: int, t: float | None = None) -> None:
            if body is not None:
                if body.sleep:
                    await asyncio.sleep(body.sleep)
                body.done({"i": i, "t": t} if body.record else None)

        return app, bench

    async def install(self, dsn: str) -> None:
        app, _ = self.app(dsn)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    @contextlib.asynccontextmanager
    async def producer(self, dsn: str) -> AsyncIterator[Producer]:
        app, task = self.app(dsn)
        async with app.open_async():
            await app.check_connection_async()

            class _P(Producer):
                async def enqueue_many(self, payloads: list[dict[str, Any]]) -> int:
                    return len(await task.batch_defer_async(*payloads))

                async def enqueue_one(self, payload: dict[str, Any]) -> None:
                    await task.defer_async(**payload)

            yield _P()

    async def verify(self, dsn: str, expected: int) -> None:
        done = await scalar(
            dsn, "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
        )
        if done != expected:
            raise RuntimeError(f"{self.key}: expected {expected} succeeded jobs, found {done}")

    async def worker(self, dsn: str, concurrency: int, processes: int, body: Body) -> WorkerRun:
        app, _ = self.app(dsn, body, pool=self.pool_size(concurrency))
        await app.open_async()
        options: dict[str, Any] = {
            "queues": [QUEUE],
            "concurrency": concurrency,
            "install_signal_handlers": False,
        }

        class _R(WorkerRun):
            async def drain(self) -> None:
                await app.run_worker_async(wait=False, **options)

            async def serve(self, stop: asyncio.Event) -> None:
                task = asyncio.create_task(app.run_worker_async(wait=True, **options))
                await _until(stop, task)
                task.cancel()  # procrastinate's documented way: a graceful stop
                with contextlib.suppress(asyncio.CancelledError):
                    await task

            async def close(self) -> None:
                await app.close_async()

        return _R()


def _all_libs() -> dict[str, Lib]:
    # Imported here: _libs_more builds on the classes above.
    from _libs_more import ChancyLib, ObanLib

    libs = (
        ProcrastinateLib(),
        PgQueuerLib("asyncpg"),
        PgQueuerLib("psycopg"),
        ChancyLib(),
        ObanLib(),
        WorkerCoreLib(prefetch=False),
        WorkerCoreLib(prefetch=True),
        WorkerCoreLib(prefetch=False, otel_api=True),
        WorkerCoreLib(prefetch=False, base=True),
    )
    return {lib.key: lib for lib in libs}


LIBS: dict[str, Lib] = _all_libs()
