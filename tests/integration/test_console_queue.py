"""The console's data on a real PostgreSQL: pause and resume, metrics history written
by a running worker, the workers registry, discarding dead letters, job listing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from psycopg import sql

from worker_core import BaseWorker, JobStatus, PermanentError, Queue, StageContext, TransientError
from worker_core.config import WorkerConfig
from worker_core.testing import running, wait_for, wait_for_status


class Flaky:
    """Fails permanently on payload "bad", transiently on the first attempt of "flaky"."""

    name = "work"

    async def run(self, ctx: StageContext) -> None:
        if ctx.job.payload.get("bad"):
            raise PermanentError("bad input")
        if ctx.job.payload.get("flaky") and ctx.job.attempt == 1:
            raise TransientError("try again")


class Done:
    name = "done"

    async def run(self, ctx: StageContext) -> None:
        ctx.state["done"] = True


class Worker(BaseWorker):
    def stages(self) -> list[Any]:
        return [Flaky(), Done()]


async def test_pause_is_persistent_and_claims_skip_the_paused_queue(
    queue: Queue, config: WorkerConfig
) -> None:
    assert await queue.paused() == []
    assert await queue.pause() is True
    assert await queue.pause() is False
    assert await queue.pause("other") is True
    assert await queue.paused() == ["other", "test"]
    ids = await queue.enqueue_many([{"i": i} for i in range(3)])
    assert await queue.claim("w", 10, lease_seconds=5) == []
    # A paused queue has nothing coming: run(until_empty=True) returns at once.
    worker = Worker(config)
    await asyncio.wait_for(worker.run(until_empty=True, install_signal_handlers=False), 10)
    assert worker.metrics.processed == 0
    assert {(await queue.get(i)).status for i in ids} == {JobStatus.QUEUED}  # type: ignore[union-attr]
    assert await queue.resume() is True
    assert await queue.resume() is False
    assert await queue.paused() == ["other"]
    await Worker(config).run(until_empty=True, install_signal_handlers=False)
    assert {(await queue.get(i)).status for i in ids} == {JobStatus.SUCCEEDED}  # type: ignore[union-attr]


async def test_resume_wakes_an_idle_worker(make_config: Any) -> None:
    config = make_config(queue={"poll_interval": 60.0})  # no fallback poll within the test
    async with Queue(config) as queue:
        await queue.migrate()
        await queue.pause()
        job_id = await queue.enqueue({"i": 1})
        worker = Worker(config)
        async with running(worker):
            await wait_for(lambda: _listening(worker), what="LISTEN connection")
            await queue.resume()  # its NOTIFY wakes the worker; the poll would take 60 s
            done = await wait_for_status(queue, job_id, JobStatus.SUCCEEDED, timeout=10)
        assert done.state == {"done": True}


async def _listening(worker: BaseWorker) -> bool:
    return worker.snapshot().listener_connected


async def test_pause_names_are_checked(queue: Queue) -> None:
    for bad in ("", "   ", "a\x00b", "x" * 201):
        with pytest.raises(ValueError, match="queue name"):
            await queue.pause(bad)


async def test_a_worker_run_writes_history_per_outcome_and_stage(
    make_config: Any,
) -> None:
    config = make_config(history={"flush_seconds": 60}, retry={"max_attempts": 3})
    async with Queue(config) as queue:
        await queue.migrate()
        await queue.enqueue_many([{"ok": 1}, {"ok": 2}, {"bad": True}, {"flaky": True}])
        await Worker(config).run(until_empty=True, install_signal_handlers=False)
        # The last rollups are written when the run ends (no flush happened in 60 s).
        rows = await queue.history(5)
        staged = await queue.history(5, stages=True)
    totals = {k: sum(r[k] for r in rows) for k in
              ("succeeded", "failed", "retried", "deferred", "dead_lettered")}  # fmt: skip
    assert totals == {"succeeded": 3, "failed": 2, "retried": 1, "deferred": 0,
                      "dead_lettered": 1}  # fmt: skip
    assert {r["queue"] for r in rows} == {"test"} and {r["kind"] for r in rows} == {"default"}
    assert all(r["stage"] is None for r in rows)
    assert sum(sum(r["buckets"]) for r in rows) == 5  # every attempt has a duration
    assert sum(r["seconds_sum"] for r in rows) >= 0
    by_stage: dict[str, list[int]] = {}
    for r in staged:
        if r["stage"]:
            done = by_stage.setdefault(r["stage"], [0, 0])
            done[0] += r["succeeded"]
            done[1] += r["failed"]
    assert by_stage == {"work": [3, 2], "done": [3, 0]}


async def test_history_rows_from_many_writers_add_up(queue: Queue) -> None:
    minute = int(time.time() // 60 * 60)
    row = (minute, "test", "default", "", 1, 1, 1, 0, 0, 0.5, [1] + [0] * 12)
    await asyncio.gather(*(queue.record_history([row]) for _ in range(20)))
    # Two minutes: a minute that ends between the writes and the read (the read
    # goes by the database's clock) leaves the row in the one before.
    (stored,) = [r for r in await queue.history(2) if r["minute"].timestamp() == minute]
    assert (stored["succeeded"], stored["failed"], stored["seconds_sum"]) == (20, 20, 10.0)
    assert stored["buckets"][0] == 20
    with pytest.raises(ValueError):
        await queue.history(0)
    with pytest.raises(ValueError):
        await queue.history(10**9)


async def test_history_retention(queue: Queue) -> None:
    now = int(time.time() // 60 * 60)
    old = now - 20 * 86400
    rows = [(m, "test", "default", "", 1, 0, 0, 0, 0, 0.1, [1]) for m in (old, old + 60, now)]
    await queue.record_history(rows)
    assert await queue.prune_history(14) == 2
    assert len(await queue.history(60)) == 1


async def test_workers_register_refresh_and_leave(make_config: Any) -> None:
    config = make_config(queue={"heartbeat_seconds": 0.1, "lease_seconds": 2})
    async with Queue(config) as queue:
        await queue.migrate()
        gate = asyncio.Event()

        class Wait:
            name = "wait"

            async def run(self, ctx: StageContext) -> None:
                await gate.wait()

        class Slow(BaseWorker):
            def stages(self) -> list[Any]:
                return [Wait()]

        await queue.enqueue({"i": 1})
        worker = Slow(config)
        async with running(worker):

            async def busy() -> bool:
                rows = await queue.workers()
                return bool(rows) and rows[0]["in_flight"] == 1

            await wait_for(busy, what="the worker's row with one job in flight")
            (row,) = await queue.workers()
            assert row["id"] == worker.worker_id and row["alive"]
            assert row["queues"] == ["test"] and row["concurrency"] == config.queue.concurrency
            assert row["pid"] > 0 and row["host"] and row["version"]
            gate.set()
        assert await queue.workers() == []  # a graceful stop leaves the registry


async def test_a_dead_worker_is_shown_gone_after_its_lease(queue: Queue) -> None:
    await queue.register_worker({"id": "dead-1", "host": "h", "pid": 1, "version": "v",
                                 "queues": ["test"], "kinds": None, "concurrency": 1,
                                 "in_flight": 1, "lease": 0.2})  # fmt: skip
    assert (await queue.workers())[0]["alive"] is True

    async def gone() -> bool:
        return (await queue.workers())[0]["alive"] is False

    await wait_for(gone, what="the silent worker shown gone")
    async with queue.connection() as conn:
        await conn.execute(
            sql.SQL("UPDATE {}.workers SET last_seen = now() - interval '2 days'").format(
                sql.Identifier(queue.schema)
            )
        )
    assert await queue.prune_workers() == 1


async def test_discard_moves_dead_jobs_to_cancelled(queue: Queue, config: WorkerConfig) -> None:
    dead, ok = await queue.enqueue_many([{"bad": True}, {"ok": 1}])
    await Worker(config).run(until_empty=True, install_signal_handlers=False)
    assert await queue.discard([dead, ok, 999_999]) == 1
    assert (await queue.get(dead)).status is JobStatus.CANCELLED  # type: ignore[union-attr]
    assert (await queue.get(ok)).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]
    assert await queue.discard([]) == 0


async def test_list_jobs_filters_and_pages(queue: Queue) -> None:
    ids = await queue.enqueue_many(
        [{"doc": f"d{i}", "n": i} for i in range(7)],
        correlation_ids=[f"corr-{i}" for i in range(7)],
    )
    other = await queue.enqueue({"doc": "x"}, queue="other")
    page1 = await queue.list_jobs(queue="test", limit=3)
    page2 = await queue.list_jobs(queue="test", limit=3, before=page1[-1]["id"])
    page3 = await queue.list_jobs(queue="test", limit=3, before=page2[-1]["id"])
    assert [r["id"] for r in page1 + page2 + page3] == sorted(ids, reverse=True)
    assert page1[0]["kind"] == "default" and "payload" not in page1[0]
    assert [r["id"] for r in await queue.list_jobs(search="doc=d3")] == [ids[3]]
    assert [r["id"] for r in await queue.list_jobs(search=str(ids[2]))] == [ids[2]]
    assert [r["id"] for r in await queue.list_jobs(search="corr-5")] == [ids[5]]
    assert len(await queue.list_jobs(search="doc")) == 8  # a payload key
    assert [r["id"] for r in await queue.list_jobs(queue="other")] == [other]
    assert await queue.list_jobs(status="dead") == []
    assert await queue.list_jobs(kind="default", limit=1) != []
    assert await queue.list_jobs(kind="nope") == []
    assert await queue.list_jobs(search="99999999999999999999") == []  # past bigint: no error
    with pytest.raises(ValueError):
        await queue.list_jobs(search="a\x00b")
    with pytest.raises(ValueError):
        await queue.list_jobs(status="exploded")


async def test_overview_counts_match_stats(queue: Queue, config: WorkerConfig) -> None:
    await queue.enqueue_many([{"ok": 1}, {"bad": True}])
    await queue.enqueue({"later": 1}, run_at=600)
    await queue.enqueue({"x": 1}, queue="other")
    await Worker(config).run(until_empty=True, install_signal_handlers=False)
    rows = {r["queue"]: r for r in await queue.overview()}
    for name in ("test", "other"):
        stats = await queue.stats(name)
        assert {s: rows[name][s] for s in stats} == stats
    assert (rows["test"]["ready"], rows["test"]["scheduled"]) == (0, 1)
    assert rows["other"]["ready"] == 1 and rows["other"]["oldest_ready_seconds"] >= 0


async def test_lease_has_one_holder_until_it_expires(queue: Queue) -> None:
    assert (await queue.take_lease("alerts", "a", 0.3))[0] is True
    assert (await queue.take_lease("alerts", "b", 10))[0] is False
    assert (await queue.take_lease("alerts", "a", 0.3))[0] is True  # renewal

    async def taken_over() -> bool:
        return (await queue.take_lease("alerts", "b", 10))[0]

    await wait_for(taken_over, what="lease taken over after expiry")
    assert (await queue.take_lease("alerts", "a", 10))[0] is False
    await queue.release_lease("alerts", "b")
    assert (await queue.take_lease("alerts", "a", 10))[0] is True
    with pytest.raises(ValueError):
        await queue.take_lease("alerts", "a", float("nan"))
