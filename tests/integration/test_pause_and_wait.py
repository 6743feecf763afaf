"""Pause/resume seen by running workers, and Queue.wait, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from psycopg import sql

from worker_core import BaseWorker, JobStatus, PermanentError, Queue, StageContext, WorkerConfig
from worker_core.outcomes import succeed
from worker_core.testing import running, wait_for, wait_for_status


class Gate:
    """Counts starts; holds every job until opened."""

    name = "gate"

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.starts: list[tuple[float, int]] = []

    async def run(self, ctx: StageContext) -> None:
        self.starts.append((time.monotonic(), ctx.job.id))
        await self.open.wait()
        if ctx.job.payload.get("bad"):
            raise PermanentError("bad input")


def gate_worker(gate: Gate) -> type[BaseWorker]:
    class GateWorker(BaseWorker):
        def stages(self) -> list[Any]:
            return [gate]

    return GateWorker


async def test_a_paused_queue_runs_nothing_until_resumed_then_everything(
    make_config: Callable[..., WorkerConfig],
) -> None:
    config = make_config(queue={"concurrency": 2, "prefetch": 4})
    gate = Gate()
    async with Queue(config) as queue:
        await queue.migrate()
        ids = await queue.enqueue_many([{"n": i} for i in range(10)])
        workers = [gate_worker(gate)(config), gate_worker(gate)(config)]
        async with running(workers[0]), running(workers[1]):
            # Both workers full: 4 jobs running, the other 6 in their prefetch buffers.
            await wait_for(_async(lambda: len(gate.starts) == 4), what="4 jobs running")
            await wait_for(
                _async(lambda: sum(w.snapshot().buffered for w in workers) == 6),
                what="the prefetch buffers filled",
            )
            assert await queue.pause()
            paused_at = time.monotonic()
            # Within about a second every worker gives its buffered jobs back...
            await wait_for(
                _async(lambda: sum(w.snapshot().buffered for w in workers) == 0),
                timeout=1.5,
                what="buffers released",
            )
            assert time.monotonic() - paused_at < 1.0
            late = await queue.enqueue({"n": 10})  # enqueue still works
            # ...the jobs in flight finish, and nothing else starts.
            gate.open.set()
            await wait_for(_async(lambda: sum(w.snapshot().in_flight for w in workers) == 0))
            await asyncio.sleep(1.0)
            assert len(gate.starts) == 4
            counts = await queue.stats()
            assert (counts["succeeded"], counts["queued"], counts["running"]) == (4, 7, 0)
            assert await queue.paused() == ["test"]
            assert await queue.resume()
            for job_id in [*ids, late]:
                await wait_for_status(queue, job_id, JobStatus.SUCCEEDED, timeout=10)
        # No attempt was spent on the jobs given back.
        assert {(await queue.get(i)).attempt for i in ids} == {1}  # type: ignore[union-attr]


async def test_without_listen_a_pause_is_seen_within_the_poll_interval(
    make_config: Callable[..., WorkerConfig],
) -> None:
    config = make_config(
        database={"listen_dsn": "postgresql://127.0.0.1:9/none"},
        queue={"concurrency": 1, "prefetch": 3, "poll_interval": 0.2},
    )
    gate = Gate()
    async with Queue(config) as queue:
        await queue.migrate()
        await queue.enqueue_many([{"n": i} for i in range(4)])
        worker = gate_worker(gate)(config)
        async with running(worker):
            await wait_for(_async(lambda: worker.snapshot().buffered == 3), what="prefetch")
            await queue.pause()
            started = time.monotonic()
            await wait_for(_async(lambda: worker.snapshot().buffered == 0), timeout=2)
            assert time.monotonic() - started < 1.0
            gate.open.set()
            await asyncio.sleep(0.5)
            assert len(gate.starts) == 1
            await queue.resume()
            await wait_for(_async(lambda: len(gate.starts) == 4), timeout=5)


async def test_pause_resume_of_another_queue_leaves_this_one_alone(
    make_config: Callable[..., WorkerConfig],
) -> None:
    config = make_config(queue={"name": ["a", "b"]})
    gate = Gate()
    gate.open.set()
    async with Queue(config) as queue:
        await queue.migrate()
        await queue.pause("b")
        a = await queue.enqueue({}, queue="a")
        b = await queue.enqueue({}, queue="b")
        await gate_worker(gate)(config).run(until_empty=True, install_signal_handlers=False)
        assert (await queue.get(a)).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]
        assert (await queue.get(b)).status is JobStatus.QUEUED  # type: ignore[union-attr]


# -- Queue.wait ------------------------------------------------------------------------
async def test_wait_returns_within_50_ms_of_completion(queue: Queue) -> None:
    lags = []
    for i in range(11):
        job_id = await queue.enqueue({"n": i})
        (job,) = await queue.claim("w", 1, lease_seconds=30)
        waiter = asyncio.create_task(queue.wait(job_id, timeout=10))
        # The waiter marks the job once it listens (or, LISTEN slower than the poll
        # interval, once it polls): the outcome's commit is announced from then on.
        await wait_for(functools.partial(_waited, queue, job_id), what="the wait is registered")
        assert not waiter.done()
        # Completion is the commit of the job's outcome: finish() returns after it.
        assert await queue.finish([succeed(job, stage=None, state="{}")])
        committed = time.monotonic()
        done = await waiter
        lags.append(time.monotonic() - committed)
        assert done.status is JobStatus.SUCCEEDED
    print("wait lags (ms):", sorted(round(x * 1000, 2) for x in lags))
    # The first wait opened the LISTEN connection: a slow connect (a loaded machine)
    # may leave it polling that once; from the second on, LISTEN is up.
    assert max(lags[1:]) < 0.05, lags


async def _waited(queue: Queue, job_id: int) -> bool:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT waited FROM {}.jobs WHERE id = %s").format(
                sql.Identifier(queue.config.database.schema)
            ),
            (job_id,),
        )
        row = await cur.fetchone()
    return bool(row and row[0])


async def test_wait_sees_a_workers_outcome(queue: Queue, config: WorkerConfig) -> None:
    gate = Gate()
    worker = gate_worker(gate)(config)
    async with running(worker):
        job_id = await queue.enqueue({})
        waiter = asyncio.create_task(queue.wait(job_id, timeout=10))
        await wait_for(_async(lambda: len(gate.starts) == 1))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        gate.open.set()
        job = await waiter
    assert job.status is JobStatus.SUCCEEDED and job.finished_at is not None
    # finished_at is the finishing statement's start on the database clock (this
    # host): the wait returned after it, in well under a second.
    lag = (datetime.now(UTC) - job.finished_at).total_seconds()
    assert 0 <= lag < 1.0, lag


async def test_wait_for_finished_dead_cancelled_unknown_and_timeout(
    queue: Queue, config: WorkerConfig
) -> None:
    gate = Gate()
    gate.open.set()
    ok, bad = await queue.enqueue_many([{"n": 1}, {"bad": True}])
    await gate_worker(gate)(config).run(until_empty=True, install_signal_handlers=False)
    assert (await queue.wait(ok)).status is JobStatus.SUCCEEDED  # already finished
    assert (await queue.wait(bad, timeout=1)).status is JobStatus.DEAD
    queued = await queue.enqueue({"n": 2})
    waiter = asyncio.create_task(queue.wait(queued, timeout=5))
    await asyncio.sleep(0.1)
    assert await queue.cancel(queued)
    assert (await waiter).status is JobStatus.CANCELLED
    with pytest.raises(LookupError, match="does not exist"):
        await queue.wait(10**9, timeout=1)
    never = await queue.enqueue({"n": 3})
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"job {never} did not finish within 0.3s"):
        await queue.wait(never, timeout=0.3)
    assert time.monotonic() - started < 1.0
    for bad_timeout in (-1, "1"):
        with pytest.raises(ValueError, match="timeout"):
            await queue.wait(never, timeout=bad_timeout)  # type: ignore[arg-type]


async def test_many_waits_share_one_listen_connection_and_do_not_poll(
    make_config: Callable[..., WorkerConfig], config: WorkerConfig
) -> None:
    # A poll interval far beyond the test: a LISTEN slow to connect (a loaded
    # machine) is waited for, rather than polled around, so every read is counted.
    async with Queue(make_config(queue={"poll_interval": 30})) as queue:
        await _many_waits(queue, config)


async def _many_waits(queue: Queue, config: WorkerConfig) -> None:
    await queue.migrate()
    ids = await queue.enqueue_many([{"n": i} for i in range(20)])
    reads = 0
    get = queue.get

    async def counting_get(job_id: int) -> Any:
        nonlocal reads
        reads += 1
        return await get(job_id)

    queue.get = counting_get  # type: ignore[method-assign]
    waiters = [asyncio.create_task(queue.wait(i, timeout=10)) for i in ids]
    await wait_for(lambda: reads == len(ids), what="each wait read its job once")
    await asyncio.sleep(1.5)  # nothing finishes meanwhile: nothing is read again
    assert reads == len(ids)
    async with queue.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s",
            (f"{config.database.application_name}.wait",),
        )
        row = await cur.fetchone()
    assert row is not None and row[0] == 1
    gate = Gate()
    gate.open.set()
    await gate_worker(gate)(config).run(until_empty=True, install_signal_handlers=False)
    done = await asyncio.gather(*waiters)
    assert {j.status for j in done} == {JobStatus.SUCCEEDED}
    assert reads == 2 * len(ids)  # one read when each ended


async def test_wait_polls_when_it_cannot_listen(make_config: Callable[..., WorkerConfig]) -> None:
    config = make_config(
        database={"listen_dsn": "postgresql://127.0.0.1:9/none"}, queue={"poll_interval": 0.2}
    )
    gate = Gate()
    gate.open.set()
    async with Queue(config) as queue:
        await queue.migrate()
        job_id = await queue.enqueue({})
        waiter = asyncio.create_task(queue.wait(job_id, timeout=10))
        await gate_worker(gate)(config).run(until_empty=True, install_signal_handlers=False)
        assert (await waiter).status is JobStatus.SUCCEEDED


def _async(predicate: Callable[[], bool]) -> Callable[[], Any]:
    async def check() -> bool:
        return predicate()

    return check
