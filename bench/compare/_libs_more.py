"""Adapters for chancy and Oban for Python (issue 17), on the interfaces of _libs.py.

Neither library has a drain mode, so their ``drain()`` runs the worker until no job
of the queue is left available in the database and none is running locally, then
stops it the documented way (which writes the completions it still holds). The
check is one indexed ``SELECT ... LIMIT 1`` every 20 ms on a connection of its own.

Oban needs Python >= 3.12: it runs in its own venv (``bench/compare/.venv-oban``,
``requirements-oban.txt``); run.py drives it through _worker.py subprocesses for
everything (schema, producer, verify, workers). This module is imported in both
venvs, so the libraries are imported inside the methods only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
from _libs import QUEUE, Body, Lib, Producer, WorkerRun, scalar

POLL = 0.02  # seconds between two "anything left?" checks of a drain

# The job bodies must be importable by name (both libraries store a dotted path in
# the job row); the worker process sets the Body they report to.
_BODY: Body | None = None


def _logger() -> logging.Logger:
    """WARNING, as for every library in the benchmark (chancy's default logger is at
    INFO and writes a line per job pulled)."""
    log = logging.getLogger("bench.chancy")
    log.setLevel(logging.WARNING)
    return log


async def _drain_loop(dsn: str, query: str, running: Callable[[], int]) -> None:
    """Return once ``query`` finds no row and nothing runs locally, twice in a row
    (a job claimed between the two reads shows as running on the second)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        empty = 0
        while empty < 2:
            await asyncio.sleep(POLL)
            cur = await conn.execute(query)
            left = await cur.fetchone()
            empty = empty + 1 if left is None and running() == 0 else 0


# -- chancy ------------------------------------------------------------------------------
async def chancy_job(i: int, t: float | None = None) -> None:
    """The chancy job: the same Body as every other library."""
    body = _BODY
    assert body is not None
    if body.sleep:
        await asyncio.sleep(body.sleep)
    body.done({"i": i, "t": t} if body.record else None)


CHANCY_FUNC = f"{__name__}.chancy_job"


class ChancyLib(Lib):
    """chancy with its asyncio executor: ``Queue(concurrency=c, executor=Async,
    eager_polling=True)``; other queue, worker and app settings default (pool 1-10,
    NOTIFY on, default plugins: leadership, pruner, recovery, metrics, workflow)."""

    key = "chancy"
    label = "chancy"

    def app(self, dsn: str) -> Any:
        from chancy import Chancy

        return Chancy(dsn, log=_logger())

    def queue(self, concurrency: int) -> Any:
        from chancy import Chancy, Queue

        # eager_polling: fetch again as soon as a job completes. Without it a worker
        # polls a queue every polling_interval (5 s) and on NOTIFY only, so a backlog
        # drains in bursts of `concurrency` jobs every 5 s. chancy's docs recommend
        # it where jobs are continuously available, which is what a drain is.
        return Queue(
            name=QUEUE,
            concurrency=concurrency,
            executor=Chancy.Executor.Async,
            eager_polling=True,
        )

    def settings(self, concurrency: int, processes: int) -> str:
        return (
            f"Queue(concurrency={concurrency}, executor=Async, eager_polling=True), "
            "other settings default (pool 1-10, notifications on, default plugins)"
        )

    async def install(self, dsn: str) -> None:
        async with self.app(dsn) as chancy:
            await chancy.migrate()
            await chancy.declare(self.queue(50), upsert=True)

    @contextlib.asynccontextmanager
    async def producer(self, dsn: str) -> AsyncIterator[Producer]:
        from chancy import Job

        async with self.app(dsn) as chancy:

            class _P(Producer):
                async def enqueue_many(self, payloads: list[dict[str, Any]]) -> int:
                    jobs = [Job(func=CHANCY_FUNC, queue=QUEUE, kwargs=p) for p in payloads]
                    added = 0
                    async for refs in chancy.push_many(jobs):
                        added += len(refs)
                    return added

                async def enqueue_one(self, payload: dict[str, Any]) -> None:
                    await chancy.push(Job(func=CHANCY_FUNC, queue=QUEUE, kwargs=payload))

            yield _P()

    async def verify(self, dsn: str, expected: int) -> None:
        done = await scalar(dsn, "SELECT count(*) FROM chancy_jobs WHERE state = 'succeeded'")
        if done != expected:
            raise RuntimeError(f"{self.key}: expected {expected} succeeded jobs, found {done}")

    async def worker(self, dsn: str, concurrency: int, processes: int, body: Body) -> WorkerRun:
        from chancy import Worker

        global _BODY
        _BODY = body
        app = self.app(dsn)
        await app.__aenter__()
        await app.declare(self.queue(concurrency), upsert=True)
        worker = Worker(app, register_signal_handlers=False)

        def running() -> int:
            executor = worker.executors.get(QUEUE)
            return len(executor) if executor is not None else 0

        class _R(WorkerRun):
            async def drain(self) -> None:
                await worker.start()
                try:
                    await _drain_loop(
                        dsn,
                        f"SELECT 1 FROM chancy_jobs WHERE queue = '{QUEUE}' "
                        "AND state IN ('pending', 'retrying') LIMIT 1",
                        running,
                    )
                finally:
                    await worker.stop()

            async def serve(self, stop: asyncio.Event) -> None:
                await worker.start()
                try:
                    await stop.wait()
                finally:
                    await worker.stop()

            async def close(self) -> None:
                await app.__aexit__(None, None, None)

        return _R()


# -- Oban for Python ----------------------------------------------------------------------
def oban_worker() -> Any:
    """The Oban worker class, registered under ``_libs_more.ObanBench`` (made on first
    use: the module is also imported where oban is not installed)."""
    from oban import worker
    from oban.worker import _registry

    name = f"{__name__}.ObanBench"
    if name in _registry:
        return _registry[name]

    class ObanBench:
        async def process(self, job: Any) -> None:
            body = _BODY
            assert body is not None
            if body.sleep:
                await asyncio.sleep(body.sleep)
            body.done(job.args if body.record else None)

    ObanBench.__module__ = __name__
    ObanBench.__qualname__ = "ObanBench"
    return worker(queue=QUEUE)(ObanBench)


def oban_json() -> None:
    """As ``oban start`` does: psycopg's JSON through orjson."""
    import orjson
    from psycopg.types.json import set_json_dumps, set_json_loads

    set_json_dumps(orjson.dumps)
    set_json_loads(orjson.loads)


class ObanLib(Lib):
    """Oban for Python, as ``oban start --queues bench:c`` runs it: ``Oban.create_pool``
    (1-10 connections), ``Oban(pool=pool, queues={"bench": c})``, every other option
    default (stager 1 s, pruner, lifeline, leadership), orjson for JSON, uvloop."""

    key = "oban"
    label = "oban"
    venv = "oban"  # its own virtual environment (Python >= 3.12)

    def settings(self, concurrency: int, processes: int) -> str:
        return (
            f"Oban(queues={{'bench': {concurrency}}}), create_pool() defaults (1-10), "
            "other options default, orjson JSON (as `oban start`)"
        )

    async def _pool(self, dsn: str) -> Any:
        from oban import Oban

        oban_json()
        return await Oban.create_pool(dsn)

    async def install(self, dsn: str) -> None:
        from oban.schema import install

        pool = await self._pool(dsn)
        try:
            await install(pool)
        finally:
            await pool.close()

    @contextlib.asynccontextmanager
    async def producer(self, dsn: str) -> AsyncIterator[Producer]:
        from oban import Oban

        bench = oban_worker()
        pool = await self._pool(dsn)
        try:
            async with Oban(pool=pool) as oban:  # client mode: no queues

                class _P(Producer):
                    async def enqueue_many(self, payloads: list[dict[str, Any]]) -> int:
                        return len(await oban.enqueue_many([bench.new(p) for p in payloads]))

                    async def enqueue_one(self, payload: dict[str, Any]) -> None:
                        await oban.enqueue(bench.new(payload))

                yield _P()
        finally:
            await pool.close()

    async def verify(self, dsn: str, expected: int) -> None:
        done = await scalar(dsn, "SELECT count(*) FROM oban_jobs WHERE state = 'completed'")
        if done != expected:
            raise RuntimeError(f"{self.key}: expected {expected} completed jobs, found {done}")

    async def worker(self, dsn: str, concurrency: int, processes: int, body: Body) -> WorkerRun:
        from oban import Oban

        global _BODY
        _BODY = body
        oban_worker()
        pool = await self._pool(dsn)
        oban = Oban(pool=pool, queues={QUEUE: concurrency})

        def running() -> int:
            info = oban.check_queue(QUEUE)
            return len(info.running) if info is not None else 0

        async def run_until(done: Callable[[], Awaitable[object]]) -> None:
            await oban.start()
            try:
                await done()
            finally:
                await oban.stop()

        class _R(WorkerRun):
            async def drain(self) -> None:
                await run_until(
                    lambda: _drain_loop(
                        dsn,
                        f"SELECT 1 FROM oban_jobs WHERE queue = '{QUEUE}' "
                        "AND state = 'available' LIMIT 1",
                        running,
                    )
                )

            async def serve(self, stop: asyncio.Event) -> None:
                await run_until(stop.wait)

            async def close(self) -> None:
                await pool.close()

        return _R()
