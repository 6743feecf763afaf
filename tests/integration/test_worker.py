"""BaseWorker on a real PostgreSQL: exactly-once, retries, dead letters, deferrals,
fencing, crash rescue, graceful stop, timeouts and bad stage lists."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from lease_helpers import expire_and_rescue
from psycopg import sql

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
from worker_core.testing import running, wait_for, wait_for_status

PROC_WORKER = Path(__file__).with_name("proc_worker.py")


class Step:
    """A stage that runs ``behaviour(ctx, call_number)`` and counts its calls per job."""

    def __init__(
        self,
        name: str,
        behaviour: Callable[[StageContext, int], Awaitable[None]] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.name = name
        self.behaviour = behaviour
        self.timeout = timeout
        self.calls: Counter[int] = Counter()

    async def run(self, ctx: StageContext) -> None:
        self.calls[ctx.job.id] += 1
        if self.behaviour is not None:
            await self.behaviour(ctx, self.calls[ctx.job.id])


class Worker(BaseWorker):
    def __init__(self, config: WorkerConfig, steps: list[Any], **kw: Any) -> None:
        super().__init__(config, **kw)
        self.steps = steps
        self.done: list[Job] = []
        self.dead: list[tuple[Job, BaseException]] = []
        self.events: list[str] = []

    def stages(self) -> list[Any]:
        return self.steps

    async def on_startup(self) -> None:
        self.events.append("startup")

    async def on_shutdown(self) -> None:
        self.events.append("shutdown")

    async def on_job_done(self, job: Job) -> None:
        self.done.append(job)

    async def on_dead_letter(self, job: Job, exc: BaseException) -> None:
        self.dead.append((job, exc))


async def test_design_example_word_count(queue: Queue, config: WorkerConfig) -> None:
    async def parse(ctx: StageContext, n: int) -> None:
        text = ctx.job.payload.get("text")
        if not text:
            raise PermanentError("empty document")
        ctx.state["words"] = text.split()

    async def count(ctx: StageContext, n: int) -> None:
        ctx.state["n"] = len(ctx.state["words"])
        ctx.logger.info("counted", n=ctx.state["n"])

    job_id = await queue.enqueue({"text": "hello world"})
    empty = await queue.enqueue({"text": ""})
    worker = Worker(config, [Step("parse", parse), Step("count", count)])
    await worker.run(until_empty=True)
    job = await queue.get(job_id)
    assert job is not None
    assert job.status is JobStatus.SUCCEEDED
    assert job.state["n"] == 2
    assert job.stage == "count"
    dead = await queue.get(empty)
    assert dead is not None
    assert dead.status is JobStatus.DEAD
    assert dead.last_error is not None
    assert dead.last_error["message"] == "empty document"
    assert dead.last_error["stage"] == "parse"
    assert dead.last_error["kind"] == "permanent"
    assert worker.events == ["startup", "shutdown"]
    assert [j.id for j in worker.done] == [job_id]
    assert [j.id for j, _ in worker.dead] == [empty]


async def test_three_workers_process_each_job_exactly_once(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    seen: list[tuple[int, str]] = []

    async def record(ctx: StageContext, n: int) -> None:
        await asyncio.sleep(0.002)  # stands for real work, so the workers interleave
        seen.append((ctx.job.id, ctx.worker.worker_id))

    config = make_config(queue={"concurrency": 5})
    workers = [Worker(config, [Step("work", record)]) for _ in range(3)]
    async with running(workers[0]), running(workers[1]), running(workers[2]):
        # All three up and idle (each start-up waits for its own LISTEN) before the
        # backlog arrives: one that came up late might find nothing left to do.
        for w in workers:
            await wait_for(functools.partial(_claimed_once, w), what="a first claim")
        ids = await queue.enqueue_many([{"i": i} for i in range(300)])
        await wait_for(lambda: len(seen) >= 300, timeout=30, what="300 jobs run")
    per_job = Counter(job_id for job_id, _ in seen)
    assert set(per_job) == set(ids)
    assert set(per_job.values()) == {1}
    assert all(w.metrics.processed > 0 for w in workers)
    assert sum(w.metrics.processed for w in workers) == 300
    assert (await queue.stats())["succeeded"] == 300


async def test_retry_resumes_at_the_failed_stage(queue: Queue, config: WorkerConfig) -> None:
    async def flaky(ctx: StageContext, n: int) -> None:
        if n == 1:
            raise TransientError("embedding service hiccup", status=503)
        ctx.state["two"] = "done"

    async def first(ctx: StageContext, n: int) -> None:
        ctx.state["one"] = n

    one, two = Step("one", first), Step("two", flaky)
    job_id = await queue.enqueue({})
    worker = Worker(config, [one, two])
    await worker.run(until_empty=True)
    job = await queue.get(job_id)
    assert job is not None
    assert job.status is JobStatus.SUCCEEDED
    assert (one.calls[job_id], two.calls[job_id]) == (1, 2)  # completed stage not re-run
    assert job.state == {"one": 1, "two": "done"}  # state restored from the checkpoint
    assert job.attempt == 2
    assert len(job.errors) == 1
    assert job.errors[0]["stage"] == "two"
    assert job.errors[0]["kind"] == "transient"
    assert job.errors[0]["detail"] == {"status": 503}
    summary = worker.metrics.summary()
    assert (summary["processed"], summary["failed"], summary["retried"]) == (1, 1, 1)
    assert summary["stages"]["two"] == {
        "completed": 1,
        "failed": 1,
        "avg_seconds": summary["stages"]["two"]["avg_seconds"],
    }


async def test_exhausted_attempts_go_to_dead_with_history(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    async def always(ctx: StageContext, n: int) -> None:
        ctx.state["tries"] = n
        raise ConnectionResetError(f"reset #{n}")

    config = make_config()
    job_id = await queue.enqueue({"doc": "a"}, max_attempts=3)
    worker = Worker(config, [Step("fetch", always)])
    await worker.run(until_empty=True)
    job = await queue.get(job_id)
    assert job is not None
    assert job.status is JobStatus.DEAD
    assert job.attempt == 3
    assert job.payload == {"doc": "a"}
    assert [e["message"] for e in job.errors] == ["reset #1", "reset #2", "reset #3"]
    assert job.last_error is not None
    assert "attempts exhausted" in job.last_error.get("note", "")
    assert worker.metrics.summary()["dead_lettered"] == 1
    assert worker.metrics.summary()["errors"] == {"ConnectionResetError": 3}
    assert len(worker.dead) == 1
    assert await queue.requeue([job_id]) == 1
    requeued = await queue.get(job_id)
    assert requeued is not None
    assert (requeued.status, requeued.attempt) == (JobStatus.QUEUED, 0)


async def test_unknown_errors_are_transient_validation_errors_permanent(
    queue: Queue, config: WorkerConfig
) -> None:
    from pydantic import BaseModel

    class Doc(BaseModel):
        document_id: str

    async def validate(ctx: StageContext, n: int) -> None:
        Doc.model_validate(ctx.job.payload)

    bad = await queue.enqueue({"document_id": 12})
    worker = Worker(config, [Step("validate", validate)])
    await worker.run(until_empty=True)
    job = await queue.get(bad)
    assert job is not None
    assert job.status is JobStatus.DEAD
    assert job.attempt == 1
    assert job.last_error is not None
    assert job.last_error["type"] == "ValidationError"


async def test_deferral_does_not_consume_attempts(queue: Queue, config: WorkerConfig) -> None:
    async def limited(ctx: StageContext, n: int) -> None:
        if n <= 3:
            raise RetryableError("429 from the API", retry_after=0.001)

    job_id = await queue.enqueue({}, max_attempts=1)
    worker = Worker(config, [Step("call", limited)])
    await worker.run(until_empty=True)
    job = await queue.get(job_id)
    assert job is not None
    assert job.status is JobStatus.SUCCEEDED
    assert (job.attempt, job.deferrals) == (1, 3)
    assert [e["kind"] for e in job.errors] == ["retryable"] * 3
    assert worker.metrics.summary()["deferred"] == 3


async def test_deferrals_are_bounded(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    async def forever(ctx: StageContext, n: int) -> None:
        raise RetryableError("still rate limited", retry_after=0.001)

    config = make_config(retry={"max_deferrals": 2})
    job_id = await queue.enqueue({}, max_attempts=2)
    await Worker(config, [Step("call", forever)]).run(until_empty=True)
    job = await queue.get(job_id)
    assert job is not None
    assert job.status is JobStatus.DEAD
    assert job.deferrals == 2
    assert [e["kind"] for e in job.errors] == ["retryable", "retryable", "transient", "transient"]
    assert "deferral limit 2 reached" in job.errors[2]["note"]


async def test_state_that_is_not_json_fails_permanently_naming_stage_and_key(
    queue: Queue, config: WorkerConfig
) -> None:
    async def bad_state(ctx: StageContext, n: int) -> None:
        ctx.state["handle"] = {"socket": object()}

    job_id = await queue.enqueue({})
    ok_id = await queue.enqueue({"fine": True}, priority=-1)
    worker = Worker(config, [Step("open", bad_state)])
    await worker.run(until_empty=True)
    job = await queue.get(job_id)
    assert job is not None
    assert job.status is JobStatus.DEAD
    assert job.last_error is not None
    assert "state after stage 'open'['handle']['socket']" in job.last_error["message"]
    assert (await queue.get(ok_id)).status is JobStatus.DEAD  # type: ignore[union-attr]


async def test_stage_timeout_is_transient(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    async def hang(ctx: StageContext, n: int) -> None:
        await asyncio.Event().wait()

    config = make_config()
    job_id = await queue.enqueue({}, max_attempts=2)
    await Worker(config, [Step("slow", hang, timeout=0.05)]).run(until_empty=True)
    job = await queue.get(job_id)
    assert job is not None
    assert job.status is JobStatus.DEAD
    assert [e["type"] for e in job.errors] == ["TimeoutError", "TimeoutError"]
    assert "exceeded its timeout of 0.05s" in job.errors[0]["message"]


async def test_explicit_checkpoint_survives_a_failure(queue: Queue, config: WorkerConfig) -> None:
    async def long_stage(ctx: StageContext, n: int) -> None:
        start = ctx.state.get("cursor", 0)
        for i in range(start, 10):
            ctx.state["cursor"] = i + 1
            if i == 4:
                await ctx.checkpoint()
                if n == 1:
                    raise TransientError("crash after the checkpoint")
        ctx.state["resumed_from"] = start

    job_id = await queue.enqueue({})
    await Worker(config, [Step("scan", long_stage)]).run(until_empty=True)
    job = await queue.get(job_id)
    assert job is not None
    assert job.status is JobStatus.SUCCEEDED
    assert job.state == {"cursor": 10, "resumed_from": 5}


async def test_stale_worker_completion_is_rejected_by_the_fence(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def blocked(ctx: StageContext, n: int) -> None:
        started.set()
        await release.wait()
        ctx.state["by"] = "stale"

    # Heartbeats far apart: the stale worker only learns at completion time.
    # One slot, so the stale worker cannot claim the rescued job back itself. No
    # LISTEN (nothing listens on port 9): LISTEN coming up renews the leases held,
    # which, landing after the rescue, would tell the stale run before it completes.
    config = make_config(
        database={"listen_dsn": "postgresql://127.0.0.1:9/none"},
        queue={"lease_seconds": 60, "heartbeat_seconds": 50, "concurrency": 1},
    )
    job_id = await queue.enqueue({})
    stale = Worker(config, [Step("work", blocked)])
    async with running(stale):
        await asyncio.wait_for(started.wait(), 10)
        # The lease runs out (as if the worker hung); a renewal that races it (LISTEN
        # coming up renews once) only makes the helper end it again.
        assert await expire_and_rescue(queue, job_id) == [job_id]
        [rescued] = await queue.claim("new-owner", 1, lease_seconds=60)
        assert rescued.attempt == 2
        release.set()
        await wait_for(lambda: stale.metrics.leases_lost >= 1, what="fenced write")
    job = await queue.get(job_id)
    assert job is not None
    assert (job.status, job.lease_owner, job.attempt) == (JobStatus.RUNNING, "new-owner", 2)
    assert "by" not in job.state
    assert stale.metrics.processed == 1  # it ran, but its result was discarded


async def test_lost_lease_cancels_the_running_task(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def blocked(ctx: StageContext, n: int) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    config = make_config(queue={"lease_seconds": 2, "heartbeat_seconds": 0.1})
    job_id = await queue.enqueue({})
    worker = Worker(config, [Step("work", blocked)])
    async with running(worker):
        await asyncio.wait_for(started.wait(), 10)
        async with queue.connection() as conn:  # another worker took the job over
            await conn.execute(
                sql.SQL(
                    "UPDATE {}.jobs SET lease_owner = 'thief', attempt = attempt + 1, "
                    "lease_token = gen_random_uuid()"
                ).format(sql.Identifier(queue.schema))
            )
        await asyncio.wait_for(cancelled.wait(), 10)
    job = await queue.get(job_id)
    assert job is not None
    assert (job.status, job.lease_owner) == (JobStatus.RUNNING, "thief")
    assert worker.metrics.leases_lost == 1


async def test_graceful_stop_lets_in_flight_jobs_finish(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    release = asyncio.Event()
    started = 0
    all_started = asyncio.Event()

    async def work(ctx: StageContext, n: int) -> None:
        nonlocal started
        started += 1
        if started == 3:
            all_started.set()
        await release.wait()

    ids = await queue.enqueue_many([{"i": i} for i in range(3)])
    waiting = await queue.enqueue({"i": "never claimed"}, priority=-5)
    worker = Worker(make_config(queue={"concurrency": 3}), [Step("work", work)])
    task = asyncio.create_task(worker.run(install_signal_handlers=False))
    await asyncio.wait_for(all_started.wait(), 10)
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0)  # stop() has been requested; jobs are still in flight
    assert not stopping.done()
    release.set()
    await asyncio.wait_for(stopping, 10)
    await task
    for job_id in ids:
        assert (await queue.get(job_id)).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]
    assert (await queue.get(waiting)).status is JobStatus.QUEUED  # type: ignore[union-attr]
    assert (await queue.stats())["running"] == 0


async def test_stop_after_timeout_releases_without_losing_an_attempt(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    started = asyncio.Event()

    async def first(ctx: StageContext, n: int) -> None:
        ctx.state["first"] = True

    async def stuck(ctx: StageContext, n: int) -> None:
        started.set()
        await asyncio.Event().wait()

    config = make_config(queue={"shutdown_timeout": 0.1})
    job_id = await queue.enqueue({})
    worker = Worker(config, [Step("first", first), Step("stuck", stuck)])
    task = asyncio.create_task(worker.run(install_signal_handlers=False))
    await asyncio.wait_for(started.wait(), 10)
    await worker.stop()
    await task
    job = await queue.get(job_id)
    assert job is not None
    assert (job.status, job.attempt, job.stage) == (JobStatus.QUEUED, 0, "first")
    assert job.state == {"first": True}
    assert job.lease_owner is None
    assert worker.metrics.released == 1


async def test_notify_wakes_an_idle_worker_without_polling(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    done = asyncio.Event()

    async def work(ctx: StageContext, n: int) -> None:
        done.set()

    config = make_config(queue={"poll_interval": 60})
    worker = Worker(config, [Step("work", work)])
    async with running(worker):
        await wait_for(lambda: worker.snapshot().listener_connected, what="LISTEN")
        await wait_for(lambda: worker.snapshot().last_claim_at is not None, what="first claim")
        await queue.enqueue({})
        await asyncio.wait_for(done.wait(), 5)  # far sooner than the 60 s poll


async def test_worker_can_run_again_and_keeps_metrics(queue: Queue, config: WorkerConfig) -> None:
    worker = Worker(config, [Step("noop")])
    await queue.enqueue({})
    await worker.run(until_empty=True)
    await queue.enqueue({})
    await worker.run(until_empty=True)
    assert worker.metrics.processed == 2
    assert worker.events == ["startup", "shutdown", "startup", "shutdown"]


async def test_stage_can_borrow_a_connection(queue: Queue, config: WorkerConfig) -> None:
    async def query(ctx: StageContext, n: int) -> None:
        async with ctx.connection() as conn:
            cur = await conn.execute("SELECT 40 + 2")
            row = await cur.fetchone()
            assert row is not None
            ctx.state["answer"] = row[0]

    job_id = await queue.enqueue({})
    await Worker(config, [Step("q", query)]).run(until_empty=True)
    assert (await queue.get(job_id)).state == {"answer": 42}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([], "no stages"),
        ([Step("a"), Step("a")], "two stages are named 'a'"),
        ([object()], "needs a non-empty string attribute 'name'"),
        ([Step("")], "needs a non-empty string attribute 'name'"),
        ([Step("ok", timeout=-1)], "timeout must be a positive number"),
        ([Step("nul\x00name")], "without NUL or lone surrogates"),
    ],
)
async def test_bad_stage_lists_fail_at_startup(
    queue: Queue, config: WorkerConfig, stages: list[Any], message: str
) -> None:
    await queue.enqueue({})
    worker = Worker(config, stages)
    with pytest.raises((TypeError, ValueError), match=message):
        await worker.run(until_empty=True)
    # stages() is asked after on_startup() (it may use clients opened there), and a
    # refused list still closes them; no job was claimed.
    assert worker.events == ["startup", "shutdown"]
    assert (await queue.stats())["queued"] == 1


async def test_sync_run_method_is_refused(queue: Queue, config: WorkerConfig) -> None:
    class Sync:
        name = "sync"

        def run(self, ctx: StageContext) -> None:
            pass

    with pytest.raises(TypeError, match="must be an async def"):
        await Worker(config, [Sync()]).run(until_empty=True)


async def test_unmigrated_schema_is_a_clear_error(config: WorkerConfig) -> None:
    with pytest.raises(RuntimeError, match="is not installed: run `worker-core migrate`"):
        await Worker(config, [Step("a")]).run(until_empty=True)


async def test_hook_failures_do_not_stop_the_worker(queue: Queue, config: WorkerConfig) -> None:
    class Grumpy(Worker):
        async def on_job_done(self, job: Job) -> None:
            raise RuntimeError("hook bug")

    ids = await queue.enqueue_many([{}, {}])
    worker = Grumpy(config, [Step("noop")])
    await worker.run(until_empty=True)
    for job_id in ids:
        assert (await queue.get(job_id)).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]


def _spawn(mode: str, pg_dsn: str, schema: str, **env: str) -> subprocess.Popen[str]:
    environment = {**os.environ, "WC_DSN": pg_dsn, "WC_SCHEMA": schema, **env}
    return subprocess.Popen(
        [sys.executable, str(PROC_WORKER), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=environment,
    )


async def _read_until(proc: subprocess.Popen[str], prefix: str, timeout: float = 30) -> str:
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> str:
        for line in stdout:
            if line.startswith(prefix):
                return line.strip()
        raise AssertionError(f"worker process ended before printing {prefix!r}")

    return await asyncio.wait_for(asyncio.to_thread(read), timeout)


@pytest.mark.timeout(90)
async def test_sigkill_mid_stage_then_rescue_by_another_worker(
    queue: Queue, pg_dsn: str, make_config: Callable[..., WorkerConfig]
) -> None:
    job_id = await queue.enqueue({"doc": "x"})
    proc = _spawn("block", pg_dsn, queue.schema, WC_LEASE="1.5")
    try:
        line = await _read_until(proc, f"STARTED {job_id} second")
        assert line
        # The checkpoint after 'first' is written before the kill.
        await wait_for(
            lambda: _stage_is(queue, job_id, "first"), timeout=10, what="checkpoint of 'first'"
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        _reap(proc)
    crashed = await queue.get(job_id)
    assert crashed is not None
    assert crashed.status is JobStatus.RUNNING  # orphaned until its lease runs out

    async def second(ctx: StageContext, n: int) -> None:
        ctx.state["finished_by"] = "rescuer"

    first = Step("first")
    rescuer = Worker(
        make_config(queue={"lease_seconds": 1.5, "heartbeat_seconds": 0.3}),
        [first, Step("second", second)],
    )
    async with running(rescuer):
        job = await wait_for_status(queue, job_id, JobStatus.SUCCEEDED, timeout=30)
    assert first.calls[job_id] == 0  # resumed at the stage that was interrupted
    assert job.attempt == 2
    assert job.state["finished_by"] == "rescuer"
    assert "first_by" in job.state
    assert job.errors[0]["type"] == "LeaseExpired"


@pytest.mark.timeout(90)
async def test_sigterm_lets_the_job_finish_then_exits(queue: Queue, pg_dsn: str) -> None:
    job_id = await queue.enqueue({})
    proc = _spawn("sleep", pg_dsn, queue.schema, WC_SLEEP="0.5")
    try:
        await _read_until(proc, f"STARTED {job_id} second")
        proc.send_signal(signal.SIGTERM)
        exited = await _read_until(proc, "EXITED")
        assert exited == "EXITED 1"
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        _reap(proc)
    job = await queue.get(job_id)
    assert job is not None
    assert job.status is JobStatus.SUCCEEDED
    assert job.state.get("slept") is True


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def _claimed_once(worker: BaseWorker) -> bool:
    return worker.snapshot().last_claim_at is not None


async def _stage_is(queue: Queue, job_id: int, stage: str) -> bool:
    job = await queue.get(job_id)
    return job is not None and job.stage == stage


async def test_prefetch_buffer_is_released_on_stop(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    started = asyncio.Event()

    async def stuck(ctx: StageContext, n: int) -> None:
        started.set()
        await asyncio.Event().wait()

    ids = await queue.enqueue_many([{"i": i} for i in range(10)])
    config = make_config(queue={"concurrency": 2, "prefetch": 4, "shutdown_timeout": 0.1})
    worker = Worker(config, [Step("stuck", stuck)])
    task = asyncio.create_task(worker.run(install_signal_handlers=False))
    await asyncio.wait_for(started.wait(), 10)
    await wait_for(lambda: _running_is(queue, 6), what="2 running + 4 prefetched")
    await worker.stop()
    await task
    jobs = [await queue.get(job_id) for job_id in ids]
    assert all(j is not None and j.status is JobStatus.QUEUED and j.attempt == 0 for j in jobs)
    assert worker.metrics.released == 6


async def test_prefetch_processes_each_job_once(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    seen: Counter[int] = Counter()

    async def record(ctx: StageContext, n: int) -> None:
        seen[ctx.job.id] += 1

    ids = await queue.enqueue_many([{"i": i} for i in range(500)])
    config = make_config(queue={"concurrency": 8, "prefetch": 16})
    workers = [Worker(config, [Step("r", record)]) for _ in range(2)]
    await asyncio.gather(*(w.run(until_empty=True, install_signal_handlers=False) for w in workers))
    assert set(seen) == set(ids)
    assert set(seen.values()) == {1}


async def _running_is(queue: Queue, n: int) -> bool:
    return (await queue.stats())["running"] == n


async def test_rate_limiter_is_shared_by_the_workers_jobs(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    buckets: set[int] = set()

    async def limited(ctx: StageContext, n: int) -> None:
        bucket = ctx.rate_limiter("embeddings")
        assert bucket is not None
        await bucket.acquire()
        buckets.add(id(bucket))
        assert ctx.rate_limiter("unlimited") is None

    config = make_config(rate_limits={"embeddings": {"rate": 1000, "burst": 5}})
    await queue.enqueue_many([{} for _ in range(6)])
    worker = Worker(config, [Step("call", limited)])
    await worker.run(until_empty=True)
    assert len(buckets) == 1
    assert worker.metrics.processed == 6
