"""SyncQueue on a real PostgreSQL: the same answers and refusals as Queue, the
caller's transaction, and many plain threads at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from worker_core import JobStatus, Queue, SyncQueue, WorkerConfig
from worker_core.errors import PayloadError


def migrate(config: WorkerConfig) -> None:
    async def run() -> None:
        async with Queue(config) as queue:
            await queue.migrate()

    asyncio.run(run())


@pytest.fixture
def sq(config: WorkerConfig) -> Iterator[SyncQueue]:
    migrate(config)
    with SyncQueue(config) as queue:
        yield queue


def count(sq: SyncQueue) -> int:
    return sum(sq.stats().values())


def test_producer_and_operator_methods(sq: SyncQueue) -> None:
    job_id = sq.enqueue({"doc": 1}, priority=3, correlation_id="req-1")
    job = sq.get(job_id)
    assert job is not None
    assert (job.payload, job.priority, job.correlation_id) == ({"doc": 1}, 3, "req-1")
    assert job.status is JobStatus.QUEUED and job.state == {}
    assert sq.get(job_id + 1000) is None
    assert sq.enqueue({"doc": 2}, dedupe_key="k") == sq.enqueue({"doc": 3}, dedupe_key="k")
    ids = sq.enqueue_many([{"n": i} for i in range(5)], queue="other", run_at=60)
    assert len(ids) == 5 and ids == sorted(ids)
    assert sq.stats()["queued"] == 7
    assert sq.stats("other") == {s.value: 5 if s is JobStatus.QUEUED else 0 for s in JobStatus}
    assert sq.cancel(ids[0]) is True and sq.cancel(ids[0]) is False
    assert sq.dead_letters() == [] and sq.requeue([]) == 0 and sq.requeue(job_id) == 0
    assert sq.rescue() == 0
    assert repr(sq) == f"SyncQueue(schema={sq.schema!r}, queue='test')"


def test_dead_letters_and_requeue(sq: SyncQueue) -> None:
    job_id = sq.enqueue({"doc": 1})
    with psycopg.connect(sq.config.dsn(), autocommit=True) as conn:
        conn.execute(
            f'UPDATE "{sq.schema}".jobs SET status = %s, finished_at = now() WHERE id = %s',
            ("dead", job_id),
        )
    assert [j.id for j in sq.dead_letters()] == [job_id]
    assert sq.requeue([job_id]) == 1
    job = sq.get(job_id)
    assert job is not None and job.status is JobStatus.QUEUED


def test_enqueue_many_over_several_batches_keeps_order(make_config: Any) -> None:
    config = make_config(queue={"name": "test", "enqueue_batch_size": 3})
    migrate(config)
    with SyncQueue(config) as sq:
        ids = sq.enqueue_many([{"n": i} for i in range(10)])
        assert [job.payload["n"] for job in map(sq.get, ids) if job] == list(range(10))
        assert sq.enqueue_many([]) == []


def test_connection_joins_the_callers_transaction(sq: SyncQueue) -> None:
    with psycopg.connect(sq.config.dsn()) as conn:
        kept = sq.enqueue({"doc": "kept"}, connection=conn)
        conn.commit()
        sq.enqueue({"doc": "dropped"}, connection=conn)
        sq.enqueue_many([{"doc": "dropped"}] * 3, connection=conn)
        assert sq.get(kept) is not None
        conn.rollback()
    assert count(sq) == 1


def test_connection_must_be_a_sync_psycopg_connection(sq: SyncQueue) -> None:
    async def make() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(sq.config.dsn())

    aconn = asyncio.run(make())
    try:
        with pytest.raises(TypeError, match="must be a psycopg \\(3\\) Connection"):
            sq.enqueue({}, connection=aconn)  # type: ignore[arg-type]
    finally:
        asyncio.run(aconn.close())
    assert count(sq) == 0


BAD_CALLS: list[tuple[dict[str, Any], type[Exception]]] = [
    ({"run_at": float("inf")}, ValueError),
    ({"run_at": float("nan")}, ValueError),
    ({"run_at": datetime(2000, 1, 1)}, ValueError),
    ({"run_at": timedelta(days=365 * 200)}, ValueError),
    ({"run_at": "soon"}, TypeError),
    ({"priority": True}, TypeError),
    ({"priority": 2**40}, ValueError),
    ({"max_attempts": 0}, ValueError),
    ({"queue": ""}, ValueError),
    ({"queue": "a\x00b"}, ValueError),
    ({"dedupe_key": "nul\x00"}, ValueError),
    ({"dedupe_key": "x" * 5000}, ValueError),
    ({"correlation_id": "\ud800"}, ValueError),
    ({"correlation_id": "c" * 201}, ValueError),
]


@pytest.mark.parametrize(("kwargs", "error"), BAD_CALLS)
async def test_refusals_match_queue_word_for_word(
    queue: Queue, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error) as from_async:
        await queue.enqueue({"doc": 1}, **kwargs)

    def sync_call() -> None:
        with SyncQueue(queue.config) as sq, pytest.raises(error) as from_sync:
            sq.enqueue({"doc": 1}, **kwargs)
        assert str(from_sync.value) == str(from_async.value)

    await asyncio.to_thread(sync_call)
    assert sum((await queue.stats()).values()) == 0


def test_bad_payloads_are_refused_before_sql(sq: SyncQueue) -> None:
    with pytest.raises(TypeError, match="payload must be a dict"):
        sq.enqueue(["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequence of dicts"):
        sq.enqueue_many({"a": 1})  # type: ignore[arg-type]
    with pytest.raises(PayloadError, match=r"^payload\[.x.\] is nan"):
        sq.enqueue({"x": float("nan")})
    with pytest.raises(ValueError, match="job_id"):
        sq.get(0)
    assert count(sq) == 0


def test_many_plain_threads_share_one_queue(make_config: Any) -> None:
    config = make_config(database={"pool_max_size": 4})
    migrate(config)
    errors: list[BaseException] = []
    ids: list[int] = []
    lock = threading.Lock()
    with SyncQueue(config) as sq:

        def produce(n: int) -> None:
            try:
                mine = [sq.enqueue({"thread": n, "i": i}) for i in range(20)]
                mine.append(sq.enqueue({"thread": n}, dedupe_key="shared"))
                with lock:
                    ids.extend(mine)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=produce, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert sq.stats()["queued"] == 8 * 20 + 1  # one job holds the shared key
        assert len(set(ids)) == 8 * 20 + 1


def test_unopened_and_unreachable(config: WorkerConfig, make_config: Any) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        SyncQueue(config).get(1)
    dsn = psycopg.conninfo.make_conninfo(config.dsn(), dbname="no_such_db")
    bad = make_config(database={"dsn": dsn})
    with pytest.raises(ConnectionError, match="does not exist") as caught:
        SyncQueue(bad).open()
    assert "hint" in str(caught.value)


def test_run_at_datetime_is_kept(sq: SyncQueue) -> None:
    when = datetime.now(UTC) + timedelta(hours=1)
    job = sq.get(sq.enqueue({}, run_at=when))
    assert job is not None and job.run_at is not None
    assert abs((job.run_at - when).total_seconds()) < 0.001


def test_batches_on_a_fresh_caller_transaction_roll_back_with_it(make_config: Any) -> None:
    # The caller's transaction has not run a statement yet: a block of our own
    # around the batches would BEGIN and COMMIT it, keeping the jobs.
    config = make_config(queue={"name": "test", "enqueue_batch_size": 2})
    migrate(config)
    with SyncQueue(config) as sq:
        with psycopg.connect(config.dsn()) as conn:
            assert len(sq.enqueue_many([{"n": i} for i in range(5)], connection=conn)) == 5
            conn.rollback()
        assert count(sq) == 0
        with psycopg.connect(config.dsn(), autocommit=True) as conn:
            sq.enqueue_many([{"n": i} for i in range(5)], connection=conn)
        assert count(sq) == 5
