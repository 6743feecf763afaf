"""Queue on a real PostgreSQL: migrate, enqueue, dedupe, transactions, operator calls."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from worker_core import JobStatus, Queue, WorkerConfig
from worker_core.errors import PayloadError
from worker_core.jobs import Transition
from worker_core.outcomes import Outcome, bury, checkpoint, defer, succeed


async def count_rows(queue: Queue) -> int:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT count(*) FROM {}.jobs").format(sql.Identifier(queue.schema))
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_migrate_is_idempotent(config: WorkerConfig) -> None:
    async with Queue(config) as queue:
        assert await queue.schema_version() == 0
        first = await queue.migrate()
        assert first and first[0] == 1
        assert await queue.migrate() == []
        assert await queue.schema_version() == first[-1]


async def test_concurrent_migrations_from_two_connections(config: WorkerConfig) -> None:
    async with Queue(config) as a, Queue(config) as b:
        results = await asyncio.gather(a.migrate(), b.migrate(), a.migrate(), b.migrate())
    applied = [r for r in results if r]
    assert len(applied) == 1  # exactly one caller did the work, the others waited and saw it
    async with Queue(config) as queue:
        assert await queue.schema_version() == applied[0][-1]


async def test_enqueue_and_get(queue: Queue) -> None:
    job_id = await queue.enqueue({"text": "hello"}, priority=3, correlation_id="req-1")
    job = await queue.get(job_id)
    assert job is not None
    assert job.status is JobStatus.QUEUED
    assert job.payload == {"text": "hello"}
    assert job.priority == 3
    assert job.correlation_id == "req-1"
    assert job.attempt == 0
    assert job.max_attempts == queue.config.retry.max_attempts
    generated = await queue.get(await queue.enqueue({}))
    assert generated is not None
    assert len(generated.correlation_id) == 36  # a UUID when none is given


async def test_unknown_job_is_none(queue: Queue) -> None:
    assert await queue.get(123456789) is None


async def test_enqueue_many_returns_ids_in_input_order(queue: Queue) -> None:
    ids = await queue.enqueue_many([{"i": i} for i in range(250)])
    assert len(ids) == 250
    assert len(set(ids)) == 250
    for i in (0, 17, 249):
        job = await queue.get(ids[i])
        assert job is not None
        assert job.payload == {"i": i}


async def test_enqueue_many_in_several_batches_is_atomic(
    make_config: Callable[..., WorkerConfig],
) -> None:
    config = make_config(queue={"enqueue_batch_size": 10})
    async with Queue(config) as queue:
        await queue.migrate()
        ids = await queue.enqueue_many([{"i": i} for i in range(35)])
        assert len(ids) == 35
        job = await queue.get(ids[34])
        assert job is not None
        assert job.payload == {"i": 34}
        payloads: list[Any] = [{"i": i} for i in range(30)] + [{"bad": object()}]
        with pytest.raises(PayloadError, match=r"payloads\[30\]\['bad'\]"):
            await queue.enqueue_many(payloads)
        assert await count_rows(queue) == 35


async def test_one_statement_and_one_notify_per_enqueue(queue: Queue, pg_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as listener:
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(queue.channel)))
        await queue.enqueue_many([{"i": i} for i in range(500)])
        await queue.enqueue({"one": 1})
        await queue.enqueue({"later": 1}, run_at=timedelta(hours=1))  # not claimable: no wake-up
        await queue.enqueue({"sentinel": 1}, queue="other")
        seen = []
        async for note in listener.notifies(timeout=2.0):
            seen.append(note.payload)
            if note.payload == "other":
                break
    assert seen == ["test", "test", "other"]


async def test_dedupe_key_returns_the_active_job(queue: Queue) -> None:
    first = await queue.enqueue({"v": 1}, dedupe_key="doc-1")
    again = await queue.enqueue({"v": 2}, dedupe_key="doc-1")
    other_queue = await queue.enqueue({"v": 3}, dedupe_key="doc-1", queue="other")
    assert again == first
    assert other_queue != first
    ids = await queue.enqueue_many(
        [{"v": 4}, {"v": 5}, {"v": 6}, {"v": 7}], dedupe_keys=["doc-1", "doc-2", "doc-2", None]
    )
    assert ids[0] == first
    assert ids[1] == ids[2] != first
    assert len(set(ids)) == 3
    # Once the holder is finished, the key is free again.
    jobs = await queue.claim("w", 10, lease_seconds=30)
    holder = next(j for j in jobs if j.id == first)
    await queue.finish([succeed(holder, stage=None, state=None)])
    fresh = await queue.enqueue({"v": 8}, dedupe_key="doc-1")
    assert fresh != first


async def test_concurrent_dedupe_enqueues_agree(queue: Queue) -> None:
    ids = await asyncio.gather(*[queue.enqueue({"n": n}, dedupe_key="same") for n in range(20)])
    assert len(set(ids)) == 1


async def test_enqueue_joins_the_callers_transaction(queue: Queue, pg_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        async with conn.transaction(force_rollback=True):
            job_id = await queue.enqueue({"x": 1}, connection=conn)
            cur = await conn.execute(
                sql.SQL("SELECT count(*) FROM {}.jobs WHERE id = %s").format(
                    sql.Identifier(queue.schema)
                ),
                (job_id,),
            )
            assert (await cur.fetchone()) == (1,)
            assert await queue.get(job_id) is None  # invisible outside until commit
        assert await queue.get(job_id) is None  # rolled back
        async with conn.transaction():
            kept = await queue.enqueue({"x": 2}, connection=conn)
    assert await queue.get(kept) is not None


async def test_bad_payloads_refused_before_any_sql(queue: Queue) -> None:
    with pytest.raises(PayloadError, match=r"payload\['when'\] is a datetime"):
        await queue.enqueue({"when": datetime.now(UTC)})
    with pytest.raises(TypeError, match="must be a dict"):
        await queue.enqueue(["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(PayloadError, match="NUL"):
        await queue.enqueue({"t": "a\x00b"})
    with pytest.raises(PayloadError, match="over the limit"):
        await queue.enqueue({"blob": "x" * (2 << 20)})
    with pytest.raises(ValueError, match="timezone-aware"):
        await queue.enqueue({}, run_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="max_attempts"):
        await queue.enqueue({}, max_attempts=0)
    assert await count_rows(queue) == 0


async def test_run_at_and_priority_order_claims(queue: Queue) -> None:
    low = await queue.enqueue({"n": "low"}, priority=0)
    high = await queue.enqueue({"n": "high"}, priority=10)
    later = await queue.enqueue({"n": "later"}, priority=99, run_at=timedelta(minutes=5))
    jobs = await queue.claim("w", 10, lease_seconds=30)
    assert [j.id for j in jobs] == [high, low]
    assert later not in [j.id for j in jobs]
    depth = await queue.depth()
    assert depth["scheduled"] == 1
    assert depth["running"] == 2


async def test_stats_counts_every_status(queue: Queue) -> None:
    assert await queue.stats() == {s.value: 0 for s in JobStatus}
    ids = await queue.enqueue_many([{"i": i} for i in range(5)])
    await queue.enqueue({"elsewhere": 1}, queue="other")
    assert await queue.cancel(ids[4])
    jobs = await queue.claim("w", 3, lease_seconds=30)
    by_id = {j.id: j for j in jobs}
    done, dead, _running = (by_id[ids[0]], by_id[ids[1]], by_id[ids[2]])
    written = await queue.finish(
        [
            succeed(done, stage=None, state=None),
            bury(dead, stage=None, state=None, error='{"type": "X"}'),
        ]
    )
    assert written == {done.lease_token, dead.lease_token}
    assert await queue.stats("test") == {
        "queued": 1,
        "running": 1,
        "succeeded": 1,
        "dead": 1,
        "cancelled": 1,
    }
    assert (await queue.stats())["queued"] == 2


async def test_cancel_queued_at_once_and_running_by_request(queue: Queue) -> None:
    a = await queue.enqueue({"a": 1})
    b = await queue.enqueue({"b": 1})
    await queue.claim("w", 1, lease_seconds=30)  # a is now running
    assert await queue.cancel(a)  # a cancel request: its worker stops the run
    running = await queue.get(a)
    assert running is not None and running.status is JobStatus.RUNNING
    assert running.cancel_requested_at is not None
    assert await queue.cancel(a)  # asked again: still pending, still True
    assert await queue.cancel(b)
    assert not await queue.cancel(b)
    assert not await queue.cancel(987654)
    job = await queue.get(b)
    assert job is not None
    assert job.status is JobStatus.CANCELLED and job.cancel_requested_at is None


async def test_requeue_only_dead_jobs(queue: Queue) -> None:
    a, b = await queue.enqueue_many([{"a": 1}, {"b": 1}])
    jobs = await queue.claim("w", 2, lease_seconds=30)
    ja = next(j for j in jobs if j.id == a)
    await queue.finish(
        [
            bury(
                ja,
                stage="parse",
                state='{"k": 1}',
                error='{"type": "PermanentError", "message": "bad"}',
            )
        ]
    )
    dead = await queue.dead_letters()
    assert [j.id for j in dead] == [a]
    assert dead[0].stage == "parse"
    assert dead[0].state == {"k": 1}
    assert dead[0].errors == [{"type": "PermanentError", "message": "bad"}]
    assert await queue.requeue([a, b, 999999]) == 1  # b is running, 999999 does not exist
    job = await queue.get(a)
    assert job is not None
    assert (job.status, job.attempt, job.stage, job.state) == (
        JobStatus.QUEUED,
        0,
        "parse",
        {"k": 1},
    )
    assert job.errors  # history kept
    assert await queue.requeue([a]) == 0  # no longer dead


async def test_requeue_keeps_dedupe_unique(queue: Queue) -> None:
    a = await queue.enqueue({"v": 1}, dedupe_key="k")
    [job] = await queue.claim("w", 1, lease_seconds=30)
    await queue.finish([bury(job, stage=None, state=None, error="{}")])
    b = await queue.enqueue({"v": 2}, dedupe_key="k")
    assert b != a
    assert await queue.requeue([a]) == 0  # b holds the key now


async def test_finish_is_fenced_by_the_lease_token(queue: Queue) -> None:
    job_id = await queue.enqueue({})
    [job] = await queue.claim("w1", 1, lease_seconds=30)
    assert job.lease_token is not None
    forged = replace(job, lease_token=str(uuid.uuid4()))  # same owner, same attempt
    assert await queue.finish([succeed(forged, stage=None, state=None)]) == set()
    assert await queue.finish([succeed(job, stage=None, state=None)]) == {job.lease_token}
    assert await queue.finish([bury(job, stage=None, state=None, error="{}")]) == set()
    done = await queue.get(job_id)
    assert done is not None
    assert (done.status, done.lease_token, done.lease_owner) == (JobStatus.SUCCEEDED, None, None)


async def test_a_batch_of_successes_writes_what_a_mixed_batch_writes(queue: Queue) -> None:
    # Success-only batches take a statement of their own (no transition table); a
    # batch with anything else takes the general one. The rows must not differ.
    ids = [await queue.enqueue({"n": n}, dedupe_key=f"k{n}") for n in range(4)]
    jobs = {j.id: j for j in await queue.claim("w1", 4, lease_seconds=30)}
    a, b, c, d = (jobs[i] for i in ids)
    await queue.cancel(b.id)  # a standing cancel request does not change a success
    await queue.cancel(d.id)
    plain = [succeed(a, stage="s", state='{"x": 1}'), succeed(b, stage="s", state=None)]
    assert await queue.finish(plain) == {a.lease_token, b.lease_token}
    mixed = [
        succeed(c, stage="s", state='{"x": 1}'),
        succeed(d, stage="s", state=None),
        checkpoint(replace(a, lease_token=str(uuid.uuid4())), stage="s", state="{}"),
    ]
    assert await queue.finish(mixed) == {c.lease_token, d.lease_token}
    columns = (
        "status, stage, state, attempt, deferrals, run_at = created_at, lease_owner, lease_token, "
        "lease_expires_at, cancel_requested_at, last_error, errors, errors_dropped, "
        "finished_at IS NOT NULL, updated_at >= created_at"
    )
    rows = await queue_rows(queue, columns, ids)
    assert rows[ids[0]] == rows[ids[2]]
    assert rows[ids[1]] == rows[ids[3]]
    assert rows[ids[0]][:3] == ("succeeded", "s", {"x": 1})
    assert rows[ids[1]][:3] == ("succeeded", "s", {})
    assert rows[ids[1]][9] is None  # the cancel request is cleared


async def queue_rows(queue: Queue, columns: str, ids: list[int]) -> dict[int, tuple[Any, ...]]:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT id, " + columns + " FROM {}.jobs WHERE id = ANY(%s)").format(
                sql.Identifier(queue.schema)
            ),
            (ids,),
        )
        return {row[0]: tuple(row[1:]) for row in await cur.fetchall()}


async def test_a_stale_run_of_the_same_worker_is_fenced_after_a_deferral(queue: Queue) -> None:
    # (owner, attempt) repeats: a deferral refunds the attempt, and the same worker
    # claims the job again. Only the token tells the two runs apart.
    job_id = await queue.enqueue({})
    [first] = await queue.claim("w1", 1, lease_seconds=30)
    deferred = defer(first, stage=None, state=None, delay=0.0, error='{"type": "E"}')
    assert await queue.finish([deferred]) == {first.lease_token}
    [second] = await queue.claim("w1", 1, lease_seconds=30)
    assert (second.id, second.lease_owner, second.attempt) == (job_id, "w1", first.attempt)
    assert second.lease_token != first.lease_token
    assert await queue.heartbeat([(job_id, first.lease_token or "")], lease_seconds=30) == set()
    assert await queue.finish([succeed(first, stage="stale", state='{"by": "stale"}')]) == set()
    assert await queue.heartbeat([(job_id, second.lease_token or "")], lease_seconds=30) == {
        second.lease_token
    }
    assert await queue.finish([succeed(second, stage="s", state="{}")]) == {second.lease_token}
    job = await queue.get(job_id)
    assert job is not None
    assert (job.status, job.stage, job.state, job.deferrals) == (JobStatus.SUCCEEDED, "s", {}, 1)


async def test_finish_refuses_what_the_transition_table_does_not_allow(queue: Queue) -> None:
    job_id = await queue.enqueue({})
    [job] = await queue.claim("w", 1, lease_seconds=30)
    token = job.lease_token or ""
    for event in (Transition.REQUEUE, Transition.CLAIM, Transition.RESCUE):
        # Fenced correctly, but (running, event) is not in TRANSITIONS: nothing moves.
        outcome = Outcome(job_id, token, job.attempt, event, None)
        assert await queue.finish([outcome]) == set()
    still = await queue.get(job_id)
    assert still is not None
    assert (still.status, still.attempt, still.lease_token) == (JobStatus.RUNNING, 1, token)


async def test_heartbeat_and_rescue(queue: Queue) -> None:
    a, b = await queue.enqueue_many([{"a": 1}, {"b": 1}], max_attempts=1)
    c = await queue.enqueue({"c": 1}, max_attempts=3)
    jobs = await queue.claim("w1", 3, lease_seconds=0.05)
    assert {j.id for j in jobs} == {a, b, c}
    leases = [(j.id, j.lease_token or "") for j in jobs]
    held = await queue.heartbeat(leases, lease_seconds=0.05)
    assert held == {j.lease_token for j in jobs}
    assert await queue.heartbeat([(a, str(uuid.uuid4()))], lease_seconds=30) == set()
    await asyncio.sleep(0.1)  # let the 50 ms leases expire on the database clock
    rescued = {job_id: status for job_id, _, status in await queue.rescue_expired()}
    assert rescued == {a: JobStatus.DEAD, b: JobStatus.DEAD, c: JobStatus.QUEUED}
    assert await queue.rescue() == 0  # nothing left to rescue
    job = await queue.get(c)
    assert job is not None
    assert job.last_error is not None
    assert job.last_error["type"] == "LeaseExpired"
    assert job.lease_token is None
    stale = next(j for j in jobs if j.id == c)
    assert await queue.finish([succeed(stale, stage=None, state=None)]) == set()


@pytest.mark.parametrize(
    "name",
    ["x'; DROP TABLE jobs; --", 'q" OR 1=1 --', "robert'); DELETE FROM jobs;--", "ünïcødé"],
)
async def test_sql_injection_through_queue_names_is_inert(queue: Queue, name: str) -> None:
    job_id = await queue.enqueue({"n": name}, queue=name)
    assert (await queue.stats(name))["queued"] == 1
    jobs = await queue.claim("w", 5, lease_seconds=30, queue=name)
    assert [j.id for j in jobs] == [job_id]
    assert jobs[0].queue == name
    assert await count_rows(queue) == 1


async def test_schema_name_cannot_inject(make_config: Callable[..., WorkerConfig]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        make_config(database={"schema": "public; DROP SCHEMA public CASCADE"})


async def test_two_schemas_are_isolated(
    make_config: Callable[..., WorkerConfig], pg_dsn: str
) -> None:
    config_a = make_config()
    config_b = make_config(database={"dsn": pg_dsn, "schema": config_a.database.schema + "_b"})
    try:
        async with Queue(config_a) as a, Queue(config_b) as b:
            await a.migrate()
            await b.migrate()
            await a.enqueue({"a": 1})
            assert (await a.stats())["queued"] == 1
            assert (await b.stats())["queued"] == 0
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    sql.Identifier(config_b.database.schema)
                )
            )


async def test_unreachable_database_fails_with_one_clear_line(tmp_path: Any) -> None:
    config = WorkerConfig(
        database={"dsn": f"postgresql://u:pw9876@/db?host={tmp_path}", "connect_timeout": 1}
    )
    with pytest.raises(ConnectionError) as info:
        async with Queue(config):
            pass
    assert "cannot connect to PostgreSQL" in str(info.value)
    assert "pw9876" not in str(info.value)


async def test_migrate_warns_when_an_applied_migration_changed(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    async with queue.connection() as conn:
        await conn.execute(
            sql.SQL("UPDATE {}.schema_migrations SET checksum = 'edited' WHERE version = 1").format(
                sql.Identifier(queue.schema)
            )
        )
    with caplog.at_level("WARNING", logger="worker_core.queue"):
        assert await queue.migrate() == []
    assert "applied migrations differ" in caplog.text


async def test_only_a_running_job_may_have_a_lease_owner(queue: Queue) -> None:
    # The schema guarantees that an owner means status 'running'; heartbeat and
    # finish fence on the lease token (and the status).
    job_id = await queue.enqueue({"x": 1})
    async with queue.connection() as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match="lease_owner_only_when_running"):
            await conn.execute(
                sql.SQL("UPDATE {}.jobs SET lease_owner = 'w' WHERE id = %s").format(
                    sql.Identifier(queue.schema)
                ),
                (job_id,),
            )
        # Nor a token (a previous release's rescue would otherwise leave one behind).
        with pytest.raises(psycopg.errors.CheckViolation, match="lease_token_only_when_running"):
            await conn.execute(
                sql.SQL("UPDATE {}.jobs SET lease_token = gen_random_uuid() WHERE id = %s").format(
                    sql.Identifier(queue.schema)
                ),
                (job_id,),
            )
    [job] = await queue.claim("w", 1, lease_seconds=30)
    assert job.lease_owner == "w"
    assert await queue.heartbeat([(job.id, str(uuid.uuid4()))], lease_seconds=30) == set()
    assert await queue.heartbeat([(job.id, job.lease_token or "")], lease_seconds=30) == {
        job.lease_token
    }
