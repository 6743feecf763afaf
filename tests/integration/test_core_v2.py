"""Core v2 on a real PostgreSQL: the ways the worker broke its promise (a job runs
once at a time, ends in a final state, is never stranded), each reproduced from
its description, and the parts built against them: lease tokens, isolated outcome
writes, bounded error records, ``ctx.offload``, the stall watchdog, listen_dsn."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from lease_helpers import expire_and_rescue
from offload_helpers import fail, sum_of_squares
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from worker_core import (
    BaseWorker,
    Job,
    JobStatus,
    PermanentError,
    Queue,
    RetryableError,
    StageContext,
    TransientError,
    WorkerConfig,
)
from worker_core._completer import Completer
from worker_core.jobs import Transition
from worker_core.logs import StructuredLogger
from worker_core.metrics import ProcessingMetrics
from worker_core.outcomes import MAX_DETAIL_BYTES, MAX_ERROR_RECORDS, Outcome, succeed
from worker_core.testing import running, wait_for, wait_for_status

Behaviour = Callable[[StageContext, int], Awaitable[None]]


class Step:
    """A stage that runs ``behaviour(ctx, call_number)``."""

    def __init__(self, name: str, behaviour: Behaviour) -> None:
        self.name = name
        self.behaviour = behaviour
        self.calls: Counter[int] = Counter()

    async def run(self, ctx: StageContext) -> None:
        self.calls[ctx.job.id] += 1
        await self.behaviour(ctx, self.calls[ctx.job.id])


class Worker(BaseWorker):
    def __init__(self, config: WorkerConfig, steps: list[Any]) -> None:
        super().__init__(config)
        self.steps = steps

    def stages(self) -> list[Any]:
        return self.steps


def rescue_every(config: WorkerConfig, interval: float, stop: threading.Event) -> None:
    """Another process of the fleet: its own event loop and pool, rescuing expired leases."""

    async def loop() -> None:
        async with Queue(config) as other:
            while not stop.is_set():
                await other.rescue()
                await asyncio.sleep(interval)

    asyncio.run(loop())


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# -- 1. a stage that blocks the event loop past its lease --------------------------------
@pytest.mark.timeout(90)
async def test_a_stage_blocking_the_loop_past_its_lease_ends_succeeded_never_twice_at_once(
    queue: Queue, make_config: Callable[..., WorkerConfig], caplog: pytest.LogCaptureFixture
) -> None:
    # The reproduction of issue 11: concurrency 2, lease 2 s, heartbeat 1.5 s;
    # attempt 1 blocks 3 s then awaits 2 s, later attempts await 5 s; a second
    # Queue (another process of the fleet) rescues every 0.1 s.
    config = make_config(
        queue={"concurrency": 2, "lease_seconds": 2, "heartbeat_seconds": 1.5,
               "stall_warning_seconds": 0.5},
    )  # fmt: skip
    active: Counter[int] = Counter()
    overlaps: list[int] = []
    attempts: list[int] = []

    async def parse(ctx: StageContext, n: int) -> None:
        active[ctx.job.id] += 1
        if active[ctx.job.id] > 1:
            overlaps.append(ctx.job.attempt)
        attempts.append(ctx.job.attempt)
        try:
            if ctx.job.attempt == 1:
                time.sleep(3)  # noqa: ASYNC251 -- the point: a CPU-bound parse holding the loop
                await asyncio.sleep(2)
            else:
                await asyncio.sleep(5)
        finally:
            active[ctx.job.id] -= 1

    job_id = await queue.enqueue({"doc": "big.pdf"})
    stop = threading.Event()
    rescuer = threading.Thread(target=rescue_every, args=(config, 0.1, stop))
    rescuer.start()
    worker = Worker(config, [Step("parse", parse)])
    try:
        with caplog.at_level(logging.INFO, logger="worker_core.worker"):
            async with running(worker):
                job = await wait_for_status(
                    queue, job_id, JobStatus.SUCCEEDED, JobStatus.DEAD, timeout=60
                )
    finally:
        stop.set()
        await asyncio.to_thread(rescuer.join, 10)
    assert job.status is JobStatus.SUCCEEDED, job.errors
    assert overlaps == []  # never two runs of the job at once in this worker
    assert attempts[0] == 1 and job.attempt >= 2
    assert [e["type"] for e in job.errors] == ["LeaseExpired"] * (job.attempt - 1)
    assert worker.metrics.leases_lost >= 1
    # The watchdog named the job and the stage while the loop was blocked.
    assert worker.metrics.loop_stalls >= 1
    blocked = messages(caplog, "event loop blocked")
    assert any(f"job_id={job_id}" in m and "stage='parse'" in m for m in blocked), blocked


async def test_a_job_claimed_again_by_the_same_worker_cancels_its_stale_run_first(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    # Heartbeats far apart: only the claim can tell this worker that its run is stale.
    config = make_config(queue={"concurrency": 2, "lease_seconds": 60, "heartbeat_seconds": 50})
    events: list[str] = []
    started = asyncio.Event()

    async def work(ctx: StageContext, n: int) -> None:
        events.append(f"start {ctx.job.attempt}")
        if ctx.job.attempt == 1:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                events.append("stale run cancelled")
                raise
        ctx.state["by_attempt"] = ctx.job.attempt

    job_id = await queue.enqueue({})
    worker = Worker(config, [Step("work", work)])
    async with running(worker):
        await asyncio.wait_for(started.wait(), 10)
        # The lease runs out (as if the loop hung); NOTIFY: the same worker claims it again
        assert await expire_and_rescue(queue, job_id) == [job_id]
        job = await wait_for_status(queue, job_id, JobStatus.SUCCEEDED, timeout=20)
    assert events == ["start 1", "stale run cancelled", "start 2"]
    assert (job.attempt, job.state) == (2, {"by_attempt": 2})
    assert worker.metrics.leases_lost >= 1


# -- 2. one outcome that cannot be written must not block the others ----------------------
async def test_a_poisoned_state_dead_letters_its_job_while_twenty_others_succeed(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    config = make_config(queue={"max_state_bytes": 4096})

    async def enrich(ctx: StageContext, n: int) -> None:
        poison = ctx.job.payload.get("poison")
        if poison == "surrogate":
            ctx.state["title"] = json.loads('"\\ud83d"')  # half an emoji from an API
        elif poison == "checkpoint":
            ctx.state["cursor"] = json.loads('"\\udfff"')
            await ctx.checkpoint()
        elif poison == "huge":
            ctx.state["blob"] = "x" * 10_000
        ctx.state["ok"] = True

    bad = {p: await queue.enqueue({"poison": p}) for p in ("surrogate", "checkpoint", "huge")}
    good = await queue.enqueue_many([{"i": i} for i in range(20)])
    worker = Worker(config, [Step("enrich", enrich)])
    await asyncio.wait_for(worker.run(until_empty=True, install_signal_handlers=False), 60)
    for job_id in good:
        job = await queue.get(job_id)
        assert job is not None and job.status is JobStatus.SUCCEEDED
    reasons = {
        "surrogate": "state after stage 'enrich'['title'] contains a lone UTF-16 surrogate",
        "checkpoint": "state after stage 'enrich'['cursor'] contains a lone UTF-16 surrogate",
        "huge": "over the limit of 4,096",
    }
    for poison, job_id in bad.items():
        job = await queue.get(job_id)
        assert job is not None
        assert (job.status, job.attempt) == (JobStatus.DEAD, 1), poison
        assert job.last_error is not None
        assert reasons[poison] in job.last_error["message"], job.last_error["message"]
        assert job.last_error["kind"] == "permanent"
    assert (await queue.stats())["running"] == 0


async def test_an_outcome_the_database_refuses_is_isolated_and_dead_lettered(
    queue: Queue, config: WorkerConfig
) -> None:
    # Outcomes built around the constructors' checks, as a bug or a server limit
    # would produce them: the completer must write the others and bury these.
    await queue.enqueue_many([{"i": i} for i in range(10)])
    jobs = await queue.claim("w", 10, lease_seconds=60)
    outcomes = [succeed(job, stage="s", state='{"ok": true}') for job in jobs]
    poisoned = {
        jobs[2].id: succeed(jobs[2], stage="s", state='{"t": "\\u0000"}'),  # jsonb refuses
        jobs[5].id: succeed(jobs[5], stage="s", state='{"t": "\ud83d"}'),  # UTF-8 cannot
        jobs[7].id: Outcome(
            jobs[7].id,
            jobs[7].lease_token or "",
            1,
            Transition.RETRY,
            None,
            None,
            float("nan"),
            '{"type": "E"}',
        ),  # a NaN delay
    }
    outcomes = [poisoned.get(o.job_id, o) for o in outcomes]
    metrics = ProcessingMetrics()
    completer = Completer(
        queue, flush_interval=0.0, flush_max=500, metrics=metrics,
        logger=StructuredLogger("worker_core.worker"), worker_id="w",
    )  # fmt: skip
    futures = [completer.submit(o, wait=True) for o in outcomes]
    await asyncio.wait_for(completer.flush(), 30)
    assert [f.result() for f in futures if f is not None] == [
        o.job_id not in poisoned for o in outcomes
    ]
    assert metrics.unstorable == 3
    for job in jobs:
        stored = await queue.get(job.id)
        assert stored is not None
        if job.id not in poisoned:
            assert (stored.status, stored.state) == (JobStatus.SUCCEEDED, {"ok": True})
            continue
        assert stored.status is JobStatus.DEAD
        assert stored.last_error is not None
        assert stored.last_error["type"] == "UnstorableOutcome"
        assert "could not be stored" in stored.last_error["message"]
        assert stored.state == {}  # the stored state was kept
    assert (await queue.stats())["running"] == 0


async def test_retry_delays_that_are_not_finite_cannot_wedge_a_job(
    queue: Queue, config: WorkerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    class Odd(Worker):
        def retry_delay(self, job: Job, exc: BaseException) -> float:
            if isinstance(exc, RetryableError):
                return super().retry_delay(job, exc)
            return {"nan": float("nan"), "inf": float("inf"), "neg": -5.0}[job.payload["delay"]]

    async def flaky(ctx: StageContext, n: int) -> None:
        if n == 1:
            if ctx.job.payload.get("delay") == "retry_after":
                raise RetryableError("rate limited", retry_after=float("nan"))
            raise TransientError("hiccup")

    ids = {d: await queue.enqueue({"delay": d}) for d in ("nan", "inf", "neg", "retry_after")}
    worker = Odd(config, [Step("call", flaky)])
    with caplog.at_level(logging.WARNING, logger="worker_core.worker"):
        await asyncio.wait_for(worker.run(until_empty=True, install_signal_handlers=False), 60)
    for delay, job_id in ids.items():
        job = await queue.get(job_id)
        assert job is not None and job.status is JobStatus.SUCCEEDED, (delay, job)
        assert "retry_after" not in job.errors[0]  # NaN is never stored
    assert len(messages(caplog, "did not return a finite number of seconds")) == 2  # nan, inf
    deferred = await queue.get(ids["retry_after"])
    assert deferred is not None and (deferred.attempt, deferred.deferrals) == (1, 1)


# -- 3. a NUL byte in an exception message -------------------------------------------------
async def test_a_nul_in_an_error_is_recorded_and_the_job_dead_after_one_attempt(
    queue: Queue, config: WorkerConfig
) -> None:
    async def parse(ctx: StageContext, n: int) -> None:
        raw = "X-Id: \x00\x01\ud800"
        raise PermanentError(f"bad header {raw}", header=raw, **{"k\x00": [raw]})

    job_id = await queue.enqueue({})
    worker = Worker(config, [Step("parse", parse)])
    await asyncio.wait_for(worker.run(until_empty=True, install_signal_handlers=False), 30)
    job = await queue.get(job_id)
    assert job is not None
    assert (job.status, job.attempt, len(job.errors)) == (JobStatus.DEAD, 1, 1)
    record = job.errors[0]
    assert record["type"] == "PermanentError"
    assert record["message"] == "bad header X-Id: \ufffd\x01\ufffd"
    assert record["detail"] == {
        "header": "X-Id: \ufffd\x01\ufffd",
        "k\ufffd": ["X-Id: \ufffd\x01\ufffd"],
    }
    assert "\x00" not in record["traceback"]
    assert worker.metrics.dead_lettered == 1


# -- 4. error details are bounded --------------------------------------------------------
async def test_error_storage_stays_under_a_bound(queue: Queue, config: WorkerConfig) -> None:
    body = "<html>" + "x" * (2 << 20)

    async def fetch(ctx: StageContext, n: int) -> None:
        raise TransientError("upstream said no " + "!" * 10_000, body=body)

    job_id = await queue.enqueue({}, max_attempts=5)
    worker = Worker(config, [Step("fetch", fetch)])
    await asyncio.wait_for(worker.run(until_empty=True, install_signal_handlers=False), 60)
    job = await queue.get(job_id)
    assert job is not None
    assert (job.status, job.attempt, len(job.errors)) == (JobStatus.DEAD, 5, 5)
    for record in job.errors:
        assert record["truncated"]["detail"] > 2 << 20
        assert record["truncated"]["message"] == len("upstream said no ") + 10_000
        assert len(record["detail"].encode()) <= MAX_DETAIL_BYTES
        assert record["detail"].startswith('{"body":"<html>xxx')
        assert len(json.dumps(record, ensure_ascii=False).encode()) < 16 * 1024
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT octet_length(errors::text) FROM {}.jobs WHERE id = %s").format(
                sql.Identifier(queue.schema)
            ),
            (job_id,),
        )
        row = await cur.fetchone()
    assert row is not None and row[0] < 80 * 1024  # was 10 MB


async def test_the_error_history_keeps_the_first_and_latest_records(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    async def limited(ctx: StageContext, n: int) -> None:
        if n <= 40:
            raise RetryableError(f"slow down #{n}", retry_after=0)

    job_id = await queue.enqueue({})
    worker = Worker(make_config(retry={"max_deferrals": 100}), [Step("call", limited)])
    await asyncio.wait_for(worker.run(until_empty=True, install_signal_handlers=False), 60)
    job = await queue.get(job_id)
    assert job is not None
    assert (job.status, job.deferrals) == (JobStatus.SUCCEEDED, 40)
    assert len(job.errors) == MAX_ERROR_RECORDS
    assert job.errors_dropped == 40 - MAX_ERROR_RECORDS
    kept = [int(e["message"].rsplit("#", 1)[1]) for e in job.errors]
    assert kept == [1, *range(40 - MAX_ERROR_RECORDS + 2, 41)]
    assert job.last_error is not None and job.last_error["message"] == "slow down #40"


# -- blocking work, off the loop ------------------------------------------------------------
async def test_offloaded_blocking_work_keeps_the_lease(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    config = make_config(queue={"lease_seconds": 2, "heartbeat_seconds": 0.4})

    async def parse(ctx: StageContext, n: int) -> None:
        await ctx.offload(time.sleep, 5)  # 2.5 leases long, in a thread
        total, pid = await ctx.offload(sum_of_squares, 1000, process=True)
        ctx.state.update(total=total, other_process=pid != os.getpid())
        try:
            await ctx.offload(fail, "bad page", process=True)
        except ValueError as exc:
            ctx.state["error"] = str(exc)

    job_id = await queue.enqueue({})
    stop = threading.Event()
    rescuer = threading.Thread(target=rescue_every, args=(config, 0.1, stop))
    rescuer.start()
    worker = Worker(config, [Step("parse", parse)])
    try:
        await asyncio.wait_for(worker.run(until_empty=True, install_signal_handlers=False), 60)
    finally:
        stop.set()
        await asyncio.to_thread(rescuer.join, 10)
    job = await queue.get(job_id)
    assert job is not None
    assert (job.status, job.attempt, job.errors) == (JobStatus.SUCCEEDED, 1, [])
    assert job.state == {"total": sum(i * i for i in range(1000)), "other_process": True,
                         "error": "bad page"}  # fmt: skip
    assert worker.metrics.loop_stalls == 0


async def test_the_watchdog_names_the_job_and_stage_that_block_the_loop(
    queue: Queue, make_config: Callable[..., WorkerConfig], caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(queue={"stall_warning_seconds": 0.2})

    async def slow(ctx: StageContext, n: int) -> None:
        time.sleep(0.8)  # noqa: ASYNC251 -- what the watchdog is for

    job_id = await queue.enqueue({})
    worker = Worker(config, [Step("slow", slow)])
    with caplog.at_level(logging.INFO, logger="worker_core.worker"):
        await worker.run(until_empty=True, install_signal_handlers=False)
    blocked = [m for m in messages(caplog, "event loop blocked") if f"job_id={job_id}" in m]
    assert len(blocked) == 1 and "stage='slow'" in blocked[0], blocked
    assert any(f"job_id={job_id}" in m for m in messages(caplog, "event loop unblocked"))
    assert worker.metrics.summary()["loop_stalls"] >= 1
    text = worker.metrics.collector().render()
    assert 'worker_core_event_loop_stalls_total{queue="test"}' in text


# -- listen_dsn ----------------------------------------------------------------------------
async def test_listen_dsn_carries_the_listen_connection(
    queue: Queue, make_config: Callable[..., WorkerConfig], pg_dsn: str
) -> None:
    done = asyncio.Event()

    async def work(ctx: StageContext, n: int) -> None:
        done.set()

    params = {k: str(v) for k, v in conninfo_to_dict(pg_dsn).items() if v is not None}
    direct = make_conninfo("", **params)  # the same server, another spelling
    config = make_config(database={"listen_dsn": direct}, queue={"poll_interval": 60})
    worker = Worker(config, [Step("work", work)])
    async with running(worker):
        await wait_for(lambda: worker.snapshot().listener_connected, what="LISTEN")
        await wait_for(lambda: worker.snapshot().last_claim_at is not None, what="claim")
        await queue.enqueue({})
        await asyncio.wait_for(done.wait(), 5)  # far sooner than the 60 s poll


async def test_the_start_up_probe_becomes_the_listen_connection(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    # Each connection costs the server a backend start (and over TCP an
    # authentication): an idle worker holds its pool's first connection and LISTEN,
    # which is the connection that checked the server at start, renamed.
    app = f"wc-probe-{os.getpid()}"
    config = make_config(database={"application_name": app})
    worker = Worker(config, [Step("work", _nothing)])
    async with running(worker):
        await wait_for(lambda: worker.snapshot().listener_connected, what="LISTEN")
        await wait_for(lambda: worker.snapshot().last_claim_at is not None, what="claim")
        async with queue.connection() as conn:
            cur = await conn.execute(
                "SELECT application_name, backend_start FROM pg_stat_activity "
                "WHERE application_name LIKE %s ORDER BY backend_start",
                (app + "%",),
            )
            rows = await cur.fetchall()
    names = [name for name, _ in rows]
    assert sorted(names) == sorted([app, f"{app}.listen"]), names
    # The LISTEN connection is the oldest: it was made before the pool's first one.
    assert names[0] == f"{app}.listen", rows
    assert worker.snapshot().listener_connects == 1


async def test_a_listen_dsn_that_fails_leaves_the_worker_polling(
    queue: Queue, make_config: Callable[..., WorkerConfig], caplog: pytest.LogCaptureFixture
) -> None:
    nowhere = "postgresql://u:listen-pw-123@/postgres?host=/nonexistent/wc-listen"
    config = make_config(database={"listen_dsn": nowhere}, queue={"poll_interval": 0.1})
    ids = await queue.enqueue_many([{"i": i} for i in range(3)])
    worker = Worker(config, [Step("work", _nothing)])
    with caplog.at_level(logging.WARNING, logger="worker_core.worker"):
        async with running(worker):
            for job_id in ids:
                await wait_for_status(queue, job_id, JobStatus.SUCCEEDED, timeout=10)
            assert not worker.snapshot().listener_connected
    failed = messages(caplog, "LISTEN connection failed")
    assert len(failed) == 1  # once per outage, not once per retry
    assert "listen-pw-123" not in caplog.text


async def _nothing(ctx: StageContext, n: int) -> None:
    return None


# -- shutdown ---------------------------------------------------------------------------------
async def test_a_task_that_swallows_its_cancellation_does_not_hang_the_stop(
    queue: Queue,
    make_config: Callable[..., WorkerConfig],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import worker_core._runtime as runtime
    from worker_core._maintenance import Maintenance

    swallowed = asyncio.Event()

    async def deaf_loop(self: Maintenance) -> None:
        # What a bug in a loop does: it catches the cancellation and goes on (here,
        # until it is cancelled a second time, so the test can end it).
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(Maintenance, "vacuum_loop", deaf_loop)
    monkeypatch.setattr(runtime, "CANCEL_WAIT", 0.3)
    worker = Worker(make_config(), [Step("work", _nothing)])
    with caplog.at_level(logging.ERROR, logger="worker_core.worker"):
        await asyncio.wait_for(worker.run(until_empty=True), 10)
    assert swallowed.is_set()
    assert len(messages(caplog, "did not end when cancelled")) == 1
    assert "worker_core.vacuum" in caplog.text
    [left] = [t for t in asyncio.all_tasks() if t.get_name() == "worker_core.vacuum"]
    left.cancel()
    with pytest.raises(asyncio.CancelledError):
        await left
