"""Cancelling running jobs on a real PostgreSQL: the owning worker stops the run at its
next await and the job ends cancelled, fenced by its lease token."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from psycopg import sql

from worker_core import BaseWorker, Job, JobStatus, Queue, StageContext, WorkerConfig
from worker_core.cli import main
from worker_core.testing import running, wait_for, wait_for_status

PROC_WORKER = Path(__file__).with_name("proc_worker.py")


class First:
    name = "first"

    async def run(self, ctx: StageContext) -> None:
        ctx.state["first"] = True


class Hold:
    """Waits until released; records what it saw."""

    name = "hold"

    def __init__(self, *, swallow: bool = False, fail: bool = False) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.saw_cancel: list[int] = []
        self.swallow, self.fail = swallow, fail

    async def run(self, ctx: StageContext) -> None:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.saw_cancel.append(ctx.job.id)
            if not self.swallow:
                raise
        if self.fail:
            raise RuntimeError("the service went away")
        ctx.state["held"] = True


class HoldWorker(BaseWorker):
    hold: Hold

    def __init__(self, config: WorkerConfig, hold: Hold) -> None:
        super().__init__(config)
        self.hold = hold
        self.cancelled: list[Job] = []
        self.done: list[Job] = []

    def stages(self) -> list[Any]:
        return [First(), self.hold]

    async def on_cancelled(self, job: Job) -> None:
        self.cancelled.append(job)

    async def on_job_done(self, job: Job) -> None:
        self.done.append(job)


async def test_cancel_mid_stage_ends_cancelled_within_a_second(
    queue: Queue, config: WorkerConfig
) -> None:
    hold = Hold()
    worker = HoldWorker(config, hold)
    job_id = await queue.enqueue({"doc": 1})
    async with running(worker):
        await asyncio.wait_for(hold.started.wait(), 10)
        started = time.monotonic()
        assert await queue.cancel(job_id)
        job = await queue.wait(job_id, timeout=5)
        elapsed = time.monotonic() - started
        assert elapsed < 1.0, elapsed
        await wait_for(_async(lambda: bool(worker.cancelled)), what="on_cancelled")
    assert job.status is JobStatus.CANCELLED
    assert hold.saw_cancel == [job_id]  # the stage saw CancelledError
    assert job.stage == "first" and job.state == {"first": True}  # checkpoint kept
    assert job.finished_at is not None and job.cancel_requested_at is None
    assert job.lease_token is None and job.lease_owner is None
    assert [j.id for j in worker.cancelled] == [job_id] and worker.done == []
    assert worker.cancelled[0].status is JobStatus.CANCELLED


async def test_without_listen_the_heartbeat_carries_the_cancel(
    make_config: Callable[..., WorkerConfig],
) -> None:
    # LISTEN cannot connect (nothing listens on port 9): only the heartbeat tells.
    config = make_config(
        database={"listen_dsn": "postgresql://127.0.0.1:9/none"},
        queue={"heartbeat_seconds": 0.2},
    )
    hold = Hold()
    async with Queue(config) as queue:
        await queue.migrate()
        job_id = await queue.enqueue({})
        worker = HoldWorker(config, hold)
        async with running(worker):
            await asyncio.wait_for(hold.started.wait(), 10)
            assert not worker.snapshot().listener_connected
            started = time.monotonic()
            assert await queue.cancel(job_id)
            job = await queue.wait(job_id, timeout=5)  # its own LISTEN fails too: polls
            assert time.monotonic() - started < 2.0
        assert job.status is JobStatus.CANCELLED and hold.saw_cancel == [job_id]


async def test_a_stage_that_swallows_the_cancellation_still_ends_cancelled(
    queue: Queue, config: WorkerConfig
) -> None:
    hold = Hold(swallow=True)
    worker = HoldWorker(config, hold)
    job_id = await queue.enqueue({})
    async with running(worker):
        await asyncio.wait_for(hold.started.wait(), 10)
        assert await queue.cancel(job_id)
        job = await queue.wait(job_id, timeout=5)
    # Cancelled after the stage returned: its state is not checkpointed.
    assert job.status is JobStatus.CANCELLED and job.state == {"first": True}


async def test_a_failure_after_the_cancel_request_cancels_instead_of_retrying(
    make_config: Callable[..., WorkerConfig],
) -> None:
    # No LISTEN and a slow heartbeat: the run fails before the request reaches it.
    config = make_config(
        database={"listen_dsn": "postgresql://127.0.0.1:9/none"},
        queue={"heartbeat_seconds": 4, "lease_seconds": 10},
    )
    hold = Hold(fail=True)
    async with Queue(config) as queue:
        await queue.migrate()
        job_id = await queue.enqueue({})
        worker = HoldWorker(config, hold)
        async with running(worker):
            await asyncio.wait_for(hold.started.wait(), 10)
            assert await queue.cancel(job_id)
            hold.release.set()  # the stage raises: a retry, written as the cancel asked
            job = await wait_for_status(queue, job_id, JobStatus.CANCELLED, JobStatus.QUEUED)
        assert job.status is JobStatus.CANCELLED and job.attempt == 1
        assert job.last_error is not None and job.last_error["message"] == "the service went away"
        assert hold.saw_cancel == []


async def test_a_buffered_job_is_cancelled_without_running(
    make_config: Callable[..., WorkerConfig],
) -> None:
    config = make_config(queue={"concurrency": 1, "prefetch": 2})
    hold = Hold()
    async with Queue(config) as queue:
        await queue.migrate()
        first, second, third = await queue.enqueue_many([{"n": 1}, {"n": 2}, {"n": 3}])
        worker = HoldWorker(config, hold)
        async with running(worker):
            await asyncio.wait_for(hold.started.wait(), 10)
            await wait_for(_async(lambda: worker.snapshot().buffered == 2), what="prefetch")
            assert await queue.cancel(second)  # claimed (running in the table), not started
            job = await queue.wait(second, timeout=5)
            assert job.status is JobStatus.CANCELLED and job.state == {}
            hold.release.set()
            for job_id in (first, third):
                await wait_for_status(queue, job_id, JobStatus.SUCCEEDED)
        assert [j.id for j in worker.cancelled] == [second]


async def test_a_cancel_nobody_requested_releases_the_job(
    queue: Queue, config: WorkerConfig
) -> None:
    # Anyone allowed to NOTIFY could send a cancel: the worker stops the run, but
    # the database has no request, so the job goes back (attempt refunded) and runs.
    hold = Hold()
    worker = HoldWorker(config, hold)
    job_id = await queue.enqueue({})
    async with running(worker):
        await asyncio.wait_for(hold.started.wait(), 10)
        hold.started.clear()
        # Only the NOTIFY carries this cancel (no request in the database for the
        # heartbeat to find): the job may start before the worker's LISTEN is up.
        await wait_for(_listening(worker), what="LISTEN")
        async with queue.connection() as conn:
            await conn.execute(
                "SELECT pg_notify(%s, json_build_object('op', 'cancel', 'id', %s::int)::text)",
                (queue.control_channel, job_id),
            )
        await asyncio.wait_for(hold.started.wait(), 10)  # claimed again
        job = await queue.get(job_id)
        assert job is not None and job.status is JobStatus.RUNNING and job.attempt == 1
        hold.release.set()
        done = await queue.wait(job_id, timeout=5)
    assert done.status is JobStatus.SUCCEEDED and worker.cancelled == []
    assert hold.saw_cancel == [job_id]


def _listening(worker: BaseWorker) -> Callable[[], Awaitable[bool]]:
    async def listening() -> bool:
        return worker.snapshot().listener_connected

    return listening


async def test_a_killed_owners_cancelled_job_ends_cancelled_after_its_lease(
    queue: Queue, pg_dsn: str, schema: str
) -> None:
    job_id = await queue.enqueue({"doc": 1})
    proc = _spawn(pg_dsn, schema, WC_LEASE="2")
    try:
        assert await _read_until(proc, f"STARTED {job_id} second")
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        assert await queue.cancel(job_id)  # requested: nobody is left to act on it
        job = await queue.get(job_id)
        assert job is not None and job.status is JobStatus.RUNNING
        assert job.cancel_requested_at is not None

        async def rescued() -> bool:
            await queue.rescue()
            ended = await queue.get(job_id)
            return ended is not None and ended.status is not JobStatus.RUNNING

        await wait_for(rescued, timeout=15, interval=0.2, what="rescue after the lease")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    job = await queue.get(job_id)
    assert job is not None and job.status is JobStatus.CANCELLED
    assert job.finished_at is not None and job.cancel_requested_at is None
    assert job.last_error is not None and job.last_error["type"] == "LeaseExpired"
    assert await queue.requeue([job_id]) == 0  # cancelled is terminal


async def test_the_cancel_request_column_only_lives_on_running_jobs(queue: Queue) -> None:
    job_id = await queue.enqueue({})
    async with queue.connection() as conn:
        try:
            await conn.execute(
                sql.SQL("UPDATE {}.jobs SET cancel_requested_at = now() WHERE id = %s").format(
                    sql.Identifier(queue.schema)
                ),
                (job_id,),
            )
        except Exception as exc:
            assert "jobs_cancel_request_only_when_running" in str(exc)
        else:
            raise AssertionError("a queued job took a cancel request")


async def test_the_command_line_cancels_pauses_and_resumes(
    queue: Queue, config: WorkerConfig, pg_dsn: str, schema: str
) -> None:
    def cli(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        env = ["--dsn", pg_dsn, "--schema", schema]
        code = main([*env, *argv], stdin=io.StringIO(), stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    queued = await queue.enqueue({})
    assert await asyncio.to_thread(cli, "cancel", str(queued)) == (
        0, f"job {queued}: cancelled\n", "")  # fmt: skip
    code, _, err = await asyncio.to_thread(cli, "cancel", str(queued))
    assert (code, err) == (1, f"worker-core cancel: job {queued} is not queued or running\n")
    hold = Hold()
    job_id = await queue.enqueue({})
    async with running(HoldWorker(config, hold)):
        await asyncio.wait_for(hold.started.wait(), 10)
        code, out, err = await asyncio.to_thread(cli, "cancel", str(job_id), "--wait", "5")
    assert (code, out, err) == (0, f"job {job_id}: cancelled\n", "")
    assert await asyncio.to_thread(cli, "pause", "test") == (0, "queue 'test' paused\n", "")
    assert (await asyncio.to_thread(cli, "pause", "test"))[1] == "queue 'test' already paused\n"
    assert await queue.paused() == ["test"]
    assert await asyncio.to_thread(cli, "resume", "test") == (0, "queue 'test' resumed\n", "")
    assert await queue.paused() == []


def _async(predicate: Callable[[], bool]) -> Callable[[], Any]:
    async def check() -> bool:
        return predicate()

    return check


def _spawn(pg_dsn: str, schema: str, **env: str) -> subprocess.Popen[str]:
    environment = {**os.environ, "WC_DSN": pg_dsn, "WC_SCHEMA": schema, **env}
    return subprocess.Popen(
        [sys.executable, str(PROC_WORKER), "block"],
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
        return ""

    return await asyncio.wait_for(asyncio.to_thread(read), timeout)
