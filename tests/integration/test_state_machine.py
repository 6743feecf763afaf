"""A Hypothesis state machine of the job life cycle, against the real SQL.

Claims (some with leases that expire at once), successes, each error kind,
releases, stale writes from old lease holders, heartbeats, lease rescue, requeue
and cancel run in random orders. A simple model applies ``TRANSITIONS`` and
``plan_failure``; after every step the database must equal the model: no illegal
transition, no lost job, and no write by a stale owner.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg import sql

from worker_core import JobStatus, Queue, WorkerConfig
from worker_core.jobs import TRANSITIONS, Transition
from worker_core.queue import Outcome
from worker_core.retry import ErrorKind, plan_failure

MAX_DEFERRALS = 2
WORKERS = ("w1", "w2")


@dataclass
class Model:
    status: JobStatus = JobStatus.QUEUED
    attempt: int = 0
    deferrals: int = 0
    max_attempts: int = 1
    owner: str | None = None
    expired: bool = False
    #: Every (owner, attempt) that ever held this job, for stale writes.
    holders: list[tuple[str, int]] = field(default_factory=list)


class JobLifeCycle(RuleBasedStateMachine):
    def __init__(self, loop: asyncio.AbstractEventLoop, queue: Queue) -> None:
        super().__init__()
        self.loop = loop
        self.queue = queue
        self.jobs: dict[int, Model] = {}
        self.run(self._truncate())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _truncate(self) -> None:
        async with self.queue.connection() as conn:
            await conn.execute(
                sql.SQL("TRUNCATE {}.jobs").format(sql.Identifier(self.queue.schema))
            )

    def move(self, job: Model, event: Transition) -> None:
        job.status = TRANSITIONS[(job.status, event)]  # KeyError = an illegal transition

    def running(self, *, live: bool) -> list[int]:
        return sorted(
            i for i, j in self.jobs.items() if j.status is JobStatus.RUNNING and j.expired != live
        )

    # -- rules -------------------------------------------------------------------
    @rule(n=st.integers(1, 3), max_attempts=st.integers(1, 3))
    def enqueue(self, n: int, max_attempts: int) -> None:
        ids = self.run(
            self.queue.enqueue_many([{"n": i} for i in range(n)], max_attempts=max_attempts)
        )
        for job_id in ids:
            self.jobs[job_id] = Model(max_attempts=max_attempts)

    @rule(worker=st.sampled_from(WORKERS), limit=st.integers(1, 4), expired=st.booleans())
    def claim(self, worker: str, limit: int, expired: bool) -> None:
        lease = -1.0 if expired else 600.0
        claimed = self.run(self.queue.claim(worker, limit, lease_seconds=lease))
        queued = {i for i, j in self.jobs.items() if j.status is JobStatus.QUEUED}
        assert {j.id for j in claimed} <= queued
        assert len(claimed) == min(limit, len(queued))
        for job in claimed:
            model = self.jobs[job.id]
            self.move(model, Transition.CLAIM)
            model.attempt += 1
            model.owner, model.expired = worker, expired
            model.holders.append((worker, model.attempt))
            assert job.attempt == model.attempt

    @precondition(lambda self: self.running(live=True))
    @rule(data=st.data())
    def succeed(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.running(live=True)))
        model = self.jobs[job_id]
        self._write(job_id, Outcome(job_id, model.attempt, JobStatus.SUCCEEDED, "s", "{}"))
        self.move(model, Transition.SUCCEED)
        model.owner = None

    @precondition(lambda self: self.running(live=True))
    @rule(data=st.data(), kind=st.sampled_from(list(ErrorKind)))
    def fail(self, data: st.DataObject, kind: ErrorKind) -> None:
        job_id = data.draw(st.sampled_from(self.running(live=True)))
        model = self.jobs[job_id]
        plan = plan_failure(
            kind,
            attempt=model.attempt,
            max_attempts=model.max_attempts,
            deferrals=model.deferrals,
            max_deferrals=MAX_DEFERRALS,
        )
        error = '{"type": "E"}'
        if plan.transition is Transition.DEFER:
            outcome = Outcome(
                job_id,
                model.attempt,
                JobStatus.QUEUED,
                None,
                refund=1,
                deferred=1,
                delay=0.0,
                error=error,
            )
        elif plan.transition is Transition.RETRY:
            outcome = Outcome(job_id, model.attempt, JobStatus.QUEUED, None, delay=0.0, error=error)
        else:
            outcome = Outcome(job_id, model.attempt, JobStatus.DEAD, None, error=error)
        self._write(job_id, outcome)
        self.move(model, plan.transition)
        if plan.transition is Transition.DEFER:
            model.attempt -= 1
            model.deferrals += 1
        model.owner = None

    @precondition(lambda self: self.running(live=True))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.running(live=True)))
        model = self.jobs[job_id]
        self._write(
            job_id, Outcome(job_id, model.attempt, JobStatus.QUEUED, None, refund=1, delay=0.0)
        )
        self.move(model, Transition.RELEASE)
        model.attempt -= 1
        model.owner = None

    @precondition(lambda self: self.running(live=True))
    @rule(data=st.data())
    def hang(self, data: st.DataObject) -> None:
        """The holder stalls past its lease (a long GC pause, a frozen VM)."""
        job_id = data.draw(st.sampled_from(self.running(live=True)))
        self.run(self._expire(job_id))
        self.jobs[job_id].expired = True

    async def _expire(self, job_id: int) -> None:
        async with self.queue.connection() as conn:
            await conn.execute(
                sql.SQL(
                    "UPDATE {}.jobs SET lease_expires_at = now() - interval '1 second' "
                    "WHERE id = %s"
                ).format(sql.Identifier(self.queue.schema)),
                (job_id,),
            )

    def stale_holders(self, job_id: int) -> list[tuple[str, int]]:
        model = self.jobs[job_id]
        current = (model.owner, model.attempt) if model.status is JobStatus.RUNNING else None
        return [h for h in model.holders if h != current]

    def with_stale_holders(self) -> list[int]:
        ids = [i for i in sorted(self.jobs) if self.stale_holders(i)]
        # Most interesting: a job that a newer holder is running right now.
        running = [i for i in ids if self.jobs[i].status is JobStatus.RUNNING]
        return running or ids

    @precondition(lambda self: self.with_stale_holders())
    @rule(data=st.data(), status=st.sampled_from([JobStatus.SUCCEEDED, JobStatus.DEAD]))
    def stale_write(self, data: st.DataObject, status: JobStatus) -> None:
        job_id = data.draw(st.sampled_from(self.with_stale_holders()))
        owner, attempt = data.draw(st.sampled_from(self.stale_holders(job_id)))
        written = self.run(self.queue.finish(owner, [Outcome(job_id, attempt, status, None)]))
        assert written == set(), f"stale holder {owner}/{attempt} overwrote job {job_id}"

    @precondition(lambda self: self.running(live=True))
    @rule(data=st.data(), worker=st.sampled_from(WORKERS))
    def hang_then_rescue_and_reclaim(self, data: st.DataObject, worker: str) -> None:
        """A holder stalls; rescue returns its job and a worker (maybe the same) claims it."""
        self.hang(data)
        self.rescue()
        if any(j.status is JobStatus.QUEUED for j in self.jobs.values()):
            self.claim(worker, len(self.jobs), expired=False)

    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: str) -> None:
        mine = [
            i for i, j in self.jobs.items() if j.status is JobStatus.RUNNING and j.owner == worker
        ]
        ids = mine + [i for i in self.jobs if i not in mine][:2]
        held = self.run(self.queue.heartbeat(worker, ids, lease_seconds=600))
        assert held == set(mine)
        for job_id in mine:
            self.jobs[job_id].expired = False

    @rule()
    def rescue(self) -> None:
        rescued = {job_id: status for job_id, _, status in self.run(self.queue.rescue())}
        expected = {}
        for job_id in self.running(live=False):
            model = self.jobs[job_id]
            exhausted = model.attempt >= model.max_attempts
            self.move(model, Transition.RESCUE_DEAD if exhausted else Transition.RESCUE)
            model.owner = None
            expected[job_id] = model.status
        assert rescued == expected

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def requeue(self, data: st.DataObject) -> None:
        picked = data.draw(st.lists(st.sampled_from(sorted(self.jobs)), max_size=4, unique=True))
        moved = self.run(self.queue.requeue(picked))
        dead = [i for i in picked if self.jobs[i].status is JobStatus.DEAD]
        assert moved == len(dead)
        for job_id in dead:
            model = self.jobs[job_id]
            self.move(model, Transition.REQUEUE)
            model.attempt = model.deferrals = 0

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.jobs)))
        model = self.jobs[job_id]
        cancelled = self.run(self.queue.cancel(job_id))
        assert cancelled == (model.status is JobStatus.QUEUED)
        if cancelled:
            self.move(model, Transition.CANCEL)

    def _write(self, job_id: int, outcome: Outcome) -> None:
        model = self.jobs[job_id]
        assert model.owner is not None
        written = self.run(self.queue.finish(model.owner, [outcome]))
        assert written == {job_id}

    # -- the database equals the model ---------------------------------------------
    @invariant()
    def database_matches_model(self) -> None:
        rows = self.run(self._rows())
        assert set(rows) == set(self.jobs), "a job was lost or appeared"
        for job_id, model in self.jobs.items():
            status, attempt, deferrals, owner = rows[job_id]
            assert (JobStatus(status), attempt, deferrals) == (
                model.status,
                model.attempt,
                model.deferrals,
            ), f"job {job_id}"
            assert owner == (model.owner if model.status is JobStatus.RUNNING else None)

    async def _rows(self) -> dict[int, tuple[str, int, int, str | None]]:
        async with self.queue.connection() as conn:
            cur = await conn.execute(
                sql.SQL("SELECT id, status, attempt, deferrals, lease_owner FROM {}.jobs").format(
                    sql.Identifier(self.queue.schema)
                )
            )
            return {r[0]: (r[1], r[2], r[3], r[4]) for r in await cur.fetchall()}


def _examples(n: int) -> int:
    # n in CI; `make fuzz` (profile "fuzz") runs WORKER_CORE_FUZZ_FACTOR / 2 times as
    # many: each example drives the real SQL, so the factor is halved.
    if settings.get_current_profile_name() != "fuzz":
        return n
    return n * max(1, int(os.environ.get("WORKER_CORE_FUZZ_FACTOR", "20")) // 2)


@pytest.mark.hypothesis  # a property test too: `make fuzz` runs it
@pytest.mark.timeout(3600 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 300)
def test_job_state_machine(make_config: Callable[..., WorkerConfig]) -> None:
    config = make_config(retry={"max_deferrals": MAX_DEFERRALS})
    loop = asyncio.new_event_loop()
    queue = Queue(config)
    try:
        loop.run_until_complete(queue.open())
        loop.run_until_complete(queue.migrate())

        class Bound(JobLifeCycle):
            def __init__(self) -> None:
                super().__init__(loop, queue)

        run_state_machine_as_test(
            Bound,
            settings=settings(
                max_examples=_examples(60),
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        loop.run_until_complete(queue.close())
        loop.close()
