"""Database faults under load: backends terminated, the server stopped and restarted.

Workers must reconnect (pool and LISTEN), lose no job, leave none running, and
the figures are printed for the record.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from worker_core import BaseWorker, Queue, StageContext, WorkerConfig
from worker_core.testing import wait_for


class Work:
    name = "work"

    def __init__(self, seen: Counter[int]) -> None:
        self.seen = seen

    async def run(self, ctx: StageContext) -> None:
        await asyncio.sleep(0.005)
        self.seen[ctx.job.id] += 1


class Steady(BaseWorker):
    def __init__(self, config: WorkerConfig, seen: Counter[int]) -> None:
        super().__init__(config)
        self.seen = seen

    def stages(self) -> list[Any]:
        return [Work(self.seen)]


def fault_config(make_config: Callable[..., WorkerConfig]) -> WorkerConfig:
    return make_config(
        queue={
            "concurrency": 8,
            "lease_seconds": 3,
            "heartbeat_seconds": 0.5,
            "poll_interval": 0.3,
        },
        database={"connect_timeout": 2},
    )


async def drain_with_faults(
    queue: Queue,
    config: WorkerConfig,
    jobs: int,
    inject: Callable[[], Any],
    faults: int,
) -> tuple[Counter[int], Sequence[BaseWorker], float]:
    seen: Counter[int] = Counter()
    ids = await queue.enqueue_many([{"i": i} for i in range(jobs)])
    workers = [Steady(config, seen) for _ in range(2)]
    tasks = [asyncio.create_task(w.run(install_signal_handlers=False)) for w in workers]
    started = time.monotonic()
    try:
        for n in range(faults):
            await wait_for(
                functools.partial(_progress, seen, (n + 1) * jobs // (faults + 2)),
                timeout=60,
                what=f"progress before fault {n + 1}",
            )
            # Each fault must cut a live LISTEN connection: a listener still backing
            # off from the previous one would count two faults as one reconnect.
            await wait_for(
                functools.partial(_listening, workers, connects=1 + n),
                timeout=30,
                what=f"LISTEN back before fault {n + 1}",
            )
            await inject()
        await wait_for(
            lambda: _all_done(queue, ids), timeout=120, interval=0.2, what="every job succeeded"
        )
        # Jobs are found by polling too; LISTEN itself must also have come back.
        await wait_for(lambda: _listening(workers), timeout=30, what="LISTEN reconnected")
    finally:
        for w in workers:
            await w.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
    return seen, workers, time.monotonic() - started


async def _listening(workers: Sequence[BaseWorker], connects: int = 1) -> bool:
    snapshots = [w.snapshot() for w in workers]
    return all(s.listener_connected and s.listener_connects >= connects for s in snapshots)


async def _progress(seen: Counter[int], n: int) -> bool:
    return len(seen) >= n


async def _enqueue(queue: Queue, ids: list[int]) -> bool:
    try:
        ids.append(await queue.enqueue({"i": len(ids)}))
    except Exception:
        return False  # the test's own pool reconnects too
    return True


async def _all_done(queue: Queue, ids: list[int]) -> bool:
    try:
        stats = await queue.stats()
    except Exception:
        return False  # the test's own pool reconnects too
    return stats["succeeded"] == len(ids)


def report(
    name: str, jobs: int, faults: int, seen: Counter[int], elapsed: float, stats: dict[str, int]
) -> None:
    repeated = sum(1 for n in seen.values() if n > 1)
    print(
        f"\n[{name}] jobs={jobs} faults={faults} elapsed={elapsed:.1f}s "
        f"succeeded={stats['succeeded']} running={stats['running']} queued={stats['queued']} "
        f"dead={stats['dead']} lost={jobs - stats['succeeded'] - stats['dead']} "
        f"re-executed={repeated}"
    )


@pytest.mark.timeout(240)
async def test_terminated_backends(queue: Queue, make_config: Callable[..., WorkerConfig]) -> None:
    config = fault_config(make_config)

    async def terminate() -> None:
        async with queue.connection() as conn:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE 'worker_core%%' AND pid <> pg_backend_pid()"
            )

    jobs, faults = 1500, 3
    seen, workers, elapsed = await drain_with_faults(queue, config, jobs, terminate, faults)
    stats = await queue.stats()
    report("pg_terminate_backend", jobs, faults, seen, elapsed, stats)
    assert stats == {"queued": 0, "running": 0, "succeeded": jobs, "dead": 0, "cancelled": 0}
    assert len(seen) == jobs
    assert all(w.metrics.processed > 0 for w in workers)
    # LISTEN was killed and came back
    assert all(w.snapshot().listener_connects >= 2 for w in workers)


@pytest.mark.timeout(240)
async def test_server_restart(
    queue: Queue, make_config: Callable[..., WorkerConfig], pg_server: Any
) -> None:
    if pg_server is None:
        pytest.skip("needs the embedded server (WORKER_CORE_TEST_DSN is set)")
    config = fault_config(make_config)

    async def restart() -> None:
        await asyncio.to_thread(pg_server.stop, "fast")
        await asyncio.sleep(1.0)  # the outage itself
        await asyncio.to_thread(pg_server.start_again)

    jobs, faults = 1500, 2
    try:
        seen, workers, elapsed = await drain_with_faults(queue, config, jobs, restart, faults)
    finally:
        await asyncio.to_thread(pg_server.start_again)
    stats = await queue.stats()
    report("server stop/start", jobs, faults, seen, elapsed, stats)
    assert stats == {"queued": 0, "running": 0, "succeeded": jobs, "dead": 0, "cancelled": 0}
    assert len(seen) == jobs
    for w in workers:  # LISTEN came back after every restart
        assert w.snapshot().listener_connects >= 1 + faults, w.snapshot()


@pytest.mark.timeout(120)
async def test_a_long_outage_is_left_within_seconds_of_the_server_coming_back(
    queue: Queue, make_config: Callable[..., WorkerConfig], pg_server: Any
) -> None:
    """The pool's reconnect attempts back off while the server is away; after a long
    outage the worker must still be back at work within seconds of its return.

    psycopg_pool doubles the wait between attempts up to its reconnect timeout; the
    pools keep each series of attempts short (``RECONNECT_SERIES_SECONDS``), so two
    attempts are never more than about 2 s apart, whatever the outage."""
    if pg_server is None:
        pytest.skip("needs the embedded server (WORKER_CORE_TEST_DSN is set)")
    config = fault_config(make_config)
    seen: Counter[int] = Counter()
    worker = Steady(config, seen)
    task = asyncio.create_task(worker.run(install_signal_handlers=False))
    try:
        first = await queue.enqueue({"i": 0})
        await wait_for(lambda: _progress(seen, 1), timeout=30, what="the first job")
        await asyncio.to_thread(pg_server.stop, "fast")
        # Long enough for reconnect attempts doubling their wait to fall 15 s apart.
        await asyncio.sleep(16.0)
        await asyncio.to_thread(pg_server.start_again)
        back = time.monotonic()
        ids = [first]
        await wait_for(lambda: _enqueue(queue, ids), timeout=30, interval=0.1)  # not timed
        enqueued = time.monotonic()
        await wait_for(lambda: _all_done(queue, ids), timeout=60, interval=0.1)
        recovered = time.monotonic() - enqueued
        print(f"\n[long outage] enqueue after {enqueued - back:.1f}s, done {recovered:.1f}s later")
        assert recovered < 6.0
    finally:
        await asyncio.to_thread(pg_server.start_again)
        await worker.stop()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.timeout(120)
async def test_a_pool_opened_while_the_server_is_still_down_waits_for_it(
    make_config: Callable[..., WorkerConfig], pg_server: Any
) -> None:
    """Opening waits up to ``connect_timeout`` for a server still starting (a
    container started beside it): the first series of reconnect attempts must
    last that long, not the few seconds of the series once the pool is open."""
    if pg_server is None:
        pytest.skip("needs the embedded server (WORKER_CORE_TEST_DSN is set)")
    config = make_config(database={"connect_timeout": 20})
    await asyncio.to_thread(pg_server.stop, "fast")
    try:
        opening = asyncio.create_task(Queue(config).__aenter__())
        await asyncio.sleep(7.0)  # longer than one short series (4 s)
        assert not opening.done()
        await asyncio.to_thread(pg_server.start_again)
        queue = await asyncio.wait_for(opening, 20)
        try:
            async with queue.connection() as conn:
                cur = await conn.execute("SELECT 1")
                assert await cur.fetchone() == (1,)
        finally:
            await queue.close()
    finally:
        await asyncio.to_thread(pg_server.start_again)
