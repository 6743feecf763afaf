"""A Hypothesis state machine of the job life cycle, against the real SQL.

Claims (some with leases that expire at once), checkpoints, successes, each error
kind, releases, cancellations of running jobs, stale writes and heartbeats from
old runs (of another worker, or of the same worker after it claimed the job
again), lease rescue, requeue, cancel (of queued jobs, and cancel requests on
running ones, which turn any outcome that would queue the job again into a
cancel) and discard run in random orders. Every outcome is built by the
worker's own constructors (``worker_core.outcomes``: ``succeed``,
``after_failure`` over ``error_record``, ``release``, ``cancel``, ``checkpoint``),
the ones its executor uses. A simple model applies ``TRANSITIONS`` (through
``effective_event``); after every step the database must equal the model: no
illegal transition, no lost job, and no write or renewal by a stale run.
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

from worker_core import Job, JobStatus, Queue, WorkerConfig
from worker_core.errors import RetryableError
from worker_core.jobs import DEFERRED, REFUNDED, TRANSITIONS, Transition, effective_event
from worker_core.outcomes import (
    Outcome,
    after_failure,
    bury,
    cancel,
    checkpoint,
    error_record,
    release,
    succeed,
)
from worker_core.retry import ErrorKind

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
    #: The claim that runs the job now (None unless running).
    run: Job | None = None
    #: Every claim that ever held this job, for stale writes.
    claims: list[Job] = field(default_factory=list)
    #: An operator asked to cancel the running job (Queue.cancel).
    cancel_requested: bool = False


def stale_outcome(job: Job, kind: str) -> Outcome:
    """What a stale run may still try to write."""
    if kind == "succeed":
        return succeed(job, stage="stale", state='{"stale": true}')
    if kind == "bury":
        return bury(job, stage="stale", state=None, error='{"type": "Stale"}')
    if kind == "release":
        return release(job, stage="stale", state=None)
    if kind == "cancel":
        return cancel(job, stage="stale", state=None)
    return checkpoint(job, stage="stale", state='{"stale": true}')


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
            model.owner, model.expired, model.run = worker, expired, job
            assert job.lease_token and all(c.lease_token != job.lease_token for c in model.claims)
            model.claims.append(job)
            assert job.attempt == model.attempt

    def live(self, data: st.DataObject) -> tuple[Model, Job]:
        model = self.jobs[data.draw(st.sampled_from(self.running(live=True)))]
        assert model.run is not None
        return model, model.run

    def ended(self, model: Model, event: Transition) -> None:
        self.move(model, event)
        model.owner = model.run = None
        model.cancel_requested = False

    def finished(self, model: Model, outcome: Outcome) -> None:
        """Write a run's outcome; the model moves by the event it is written as."""
        self._write(model, outcome)
        event = effective_event(outcome.event, model.cancel_requested)
        if event is Transition.CHECKPOINT:
            self.move(model, event)
            return
        self.ended(model, event)
        if event in REFUNDED:
            model.attempt -= 1
        if event in DEFERRED:
            model.deferrals += 1

    @precondition(lambda self: self.running(live=True))
    @rule(data=st.data())
    def checkpoint(self, data: st.DataObject) -> None:
        model, run = self.live(data)
        self.finished(model, checkpoint(run, stage="c", state='{"cursor": 1}'))

    @precondition(lambda self: self.running(live=True))
    @rule(data=st.data())
    def succeed(self, data: st.DataObject) -> None:
        model, run = self.live(data)
        self.finished(model, succeed(run, stage="s", state="{}"))

    @precondition(lambda self: self.running(live=True))
    @rule(data=st.data(), kind=st.sampled_from(list(ErrorKind)))
    def fail(self, data: st.DataObject, kind: ErrorKind) -> None:
        model, run = self.live(data)
        exc = RetryableError("slow down", retry_after=0) if kind is ErrorKind.RETRYABLE else (
            RuntimeError("boom"))  # fmt: skip
        record = error_record(
            exc, kind=kind, stage="s", attempt=run.attempt, worker_id=model.owner or ""
        )
        outcome, plan = after_failure(
            run,
            kind,
            max_deferrals=MAX_DEFERRALS,
            stage=None,
            state=None,
            delay=0.0,
            record=record,
        )
        assert outcome.event is plan.transition
        self.finished(model, outcome)

    @precondition(lambda self: self.running(live=True))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        model, run = self.live(data)
        self.finished(model, release(run, stage=None, state=None))

    @precondition(lambda self: self.running(live=True))
    @rule(data=st.data())
    def cancel_running(self, data: st.DataObject) -> None:
        model, run = self.live(data)
        self.finished(model, cancel(run, stage=None, state=None))  # unrequested: a release

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

    def stale_claims(self, job_id: int) -> list[Job]:
        model = self.jobs[job_id]
        return [
            c for c in model.claims if model.run is None or c.lease_token != model.run.lease_token
        ]

    def with_stale_claims(self) -> list[int]:
        ids = [i for i in sorted(self.jobs) if self.stale_claims(i)]
        # Most interesting: a job that a newer claim is running right now.
        running = [i for i in ids if self.jobs[i].status is JobStatus.RUNNING]
        return running or ids

    @precondition(lambda self: self.with_stale_claims())
    @rule(
        data=st.data(),
        kind=st.sampled_from(["succeed", "bury", "release", "cancel", "checkpoint"]),
    )
    def stale_write(self, data: st.DataObject, kind: str) -> None:
        job_id = data.draw(st.sampled_from(self.with_stale_claims()))
        stale = data.draw(st.sampled_from(self.stale_claims(job_id)))
        written = self.run(self.queue.finish([stale_outcome(stale, kind)]))
        assert written == set(), f"stale run {stale.lease_owner}/{stale.attempt} wrote job {job_id}"
        renewed = self.run(
            self.queue.heartbeat([(job_id, stale.lease_token or "")], lease_seconds=600)
        )
        assert renewed == set(), f"stale run {stale.lease_owner}/{stale.attempt} renewed {job_id}"

    @precondition(lambda self: self.running(live=True))
    @rule(data=st.data(), same_worker=st.booleans())
    def hang_then_rescue_and_reclaim(self, data: st.DataObject, same_worker: bool) -> None:
        """A run stalls (its event loop blocked); rescue returns its job and a worker,
        often the very same one, claims it again while the stale run still exists."""
        job_id = data.draw(st.sampled_from(self.running(live=True)))
        owner = self.jobs[job_id].owner or WORKERS[0]
        self.run(self._expire(job_id))
        self.jobs[job_id].expired = True
        self.rescue()
        if any(j.status is JobStatus.QUEUED for j in self.jobs.values()):
            other = WORKERS[1] if owner == WORKERS[0] else WORKERS[0]
            self.claim(owner if same_worker else other, len(self.jobs), expired=False)

    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: str) -> None:
        mine = [
            j for j in self.jobs.values() if j.status is JobStatus.RUNNING and j.owner == worker
        ]
        leases = [(m.run.id, m.run.lease_token or "") for m in mine if m.run is not None]
        stale = [(i, c.lease_token or "") for i in self.jobs for c in self.stale_claims(i)]
        held = self.run(self.queue.renew_leases(leases + stale[:3], lease_seconds=600))
        assert held == {m.run.lease_token: m.cancel_requested for m in mine if m.run is not None}
        for model in mine:
            model.expired = False

    @rule()
    def rescue(self) -> None:
        rescued = {job_id: status for job_id, _, status in self.run(self.queue.rescue_expired())}
        expected = {}
        for job_id in self.running(live=False):
            model = self.jobs[job_id]
            exhausted = model.attempt >= model.max_attempts
            if model.cancel_requested:
                self.ended(model, Transition.RESCUE_CANCEL)
            else:
                self.ended(model, Transition.RESCUE_DEAD if exhausted else Transition.RESCUE)
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
        assert cancelled == (model.status in (JobStatus.QUEUED, JobStatus.RUNNING))
        if model.status is JobStatus.QUEUED:
            self.move(model, Transition.CANCEL)
        elif model.status is JobStatus.RUNNING:
            model.cancel_requested = True  # its run's next outcome decides

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        picked = data.draw(st.lists(st.sampled_from(sorted(self.jobs)), max_size=4, unique=True))
        moved = self.run(self.queue.discard(picked))
        dead = [i for i in picked if self.jobs[i].status is JobStatus.DEAD]
        assert moved == len(dead)
        for job_id in dead:
            self.move(self.jobs[job_id], Transition.DISCARD)

    def _write(self, model: Model, outcome: Outcome) -> None:
        assert model.run is not None and outcome.token == model.run.lease_token
        written = self.run(self.queue.finish([outcome]))
        assert written == {outcome.token}

    # -- the database equals the model ---------------------------------------------
    @invariant()
    def database_matches_model(self) -> None:
        rows = self.run(self._rows())
        assert set(rows) == set(self.jobs), "a job was lost or appeared"
        for job_id, model in self.jobs.items():
            status, attempt, deferrals, owner, token, requested = rows[job_id]
            assert (JobStatus(status), attempt, deferrals) == (
                model.status,
                model.attempt,
                model.deferrals,
            ), f"job {job_id}"
            running = model.status is JobStatus.RUNNING
            assert owner == (model.owner if running else None)
            assert token == (model.run.lease_token if running and model.run else None)
            assert requested == model.cancel_requested, f"job {job_id}: cancel request"

    async def _rows(self) -> dict[int, tuple[str, int, int, str | None, str | None, bool]]:
        async with self.queue.connection() as conn:
            cur = await conn.execute(
                sql.SQL(
                    "SELECT id, status, attempt, deferrals, lease_owner, lease_token::text, "
                    "cancel_requested_at IS NOT NULL FROM {}.jobs"
                ).format(sql.Identifier(self.queue.schema))
            )
            return {r[0]: (r[1], r[2], r[3], r[4], r[5], r[6]) for r in await cur.fetchall()}


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
