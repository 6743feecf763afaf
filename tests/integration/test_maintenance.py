"""Retention and the claim index on a large table."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection, sql
from psycopg.conninfo import make_conninfo

from worker_core import BaseWorker, JobStatus, Queue, StageContext, WorkerConfig
from worker_core._maintenance import Maintenance
from worker_core.logs import StructuredLogger
from worker_core.metrics import ProcessingMetrics
from worker_core.outcomes import bury, succeed
from worker_core.queue import outcomes_json
from worker_core.testing import wait_for


class Noop:
    name = "noop"

    async def run(self, ctx: StageContext) -> None:
        return None


class NoopWorker(BaseWorker):
    def stages(self) -> list[Any]:
        return [Noop()]


async def execute(queue: Queue, statement: str, *args: Any) -> list[Any]:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL(statement).format(schema=sql.Identifier(queue.schema)),
            args or None,
        )
        return await cur.fetchall() if cur.description else []


async def backdate(queue: Queue, ids: list[int], seconds: int) -> None:
    await execute(
        queue,
        "UPDATE {schema}.jobs SET finished_at = now() - %s * interval '1 second' "
        "WHERE id = ANY(%s)",
        seconds,
        ids,
    )


async def finish_all(queue: Queue, config: WorkerConfig) -> None:
    await NoopWorker(config).run(until_empty=True, install_signal_handlers=False)


def maintenance(
    queue: Queue, config: WorkerConfig, metrics: ProcessingMetrics | None = None
) -> Maintenance:
    """The component a running worker prunes and vacuums with, on ``queue``."""
    metrics = metrics or ProcessingMetrics(config.queue.primary)
    return Maintenance(queue, config, metrics, StructuredLogger("worker_core.worker"))


async def test_prune_respects_retention_per_status(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    old = await queue.enqueue_many([{"old": i} for i in range(30)])
    fresh = await queue.enqueue_many([{"fresh": i} for i in range(5)])
    config = make_config(maintenance={"retention_seconds": 3600, "batch_size": 7})
    await finish_all(queue, config)
    cancelled = await queue.enqueue({"c": 1})
    assert await queue.cancel(cancelled)
    await backdate(queue, [*old, cancelled], 7200)
    worker = maintenance(queue, config)
    assert await worker.prune() == 31  # five batches of 7, the last one short
    for job_id in old:
        assert await queue.get(job_id) is None
    for job_id in fresh:
        job = await queue.get(job_id)
        assert job is not None
        assert job.status is JobStatus.SUCCEEDED
    assert await worker.prune() == 0


async def test_prune_catches_up_beyond_any_fixed_number_of_batches(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    ids = await queue.enqueue_many([{"i": i} for i in range(50)])
    config = make_config(maintenance={"retention_seconds": 60, "batch_size": 2})
    await finish_all(queue, config)
    await backdate(queue, ids, 3600)
    worker = maintenance(queue, config)
    assert await worker.prune(max_batches=3) == 6  # an explicit cap still holds
    assert await worker.prune() == 44  # 22 full batches: more than the old cap of 20
    assert (await queue.stats())["succeeded"] == 0


async def test_dead_jobs_are_kept_unless_configured(queue: Queue) -> None:
    [job_id] = await queue.enqueue_many([{}])
    [job] = await queue.claim("w", 1, lease_seconds=30)
    await queue.finish([bury(job, stage=None, state=None, error="{}")])
    await backdate(queue, [job_id], 10 * 86400)
    assert await queue.prune(retention_seconds=60, dead_retention_seconds=None) == 0
    assert await queue.prune(retention_seconds=60, dead_retention_seconds=86400) == 1


async def test_only_one_pruner_at_a_time(queue: Queue) -> None:
    ids = await queue.enqueue_many([{} for _ in range(3)])
    for job_id in ids:
        assert await queue.cancel(job_id)
    await backdate(queue, ids, 7200)
    async with queue.connection() as conn, conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('worker_core.prune'), hashtext(%s))",
            (queue.schema,),
        )
        assert await queue.prune(retention_seconds=60) == 0  # another pruner holds the lock
    assert await queue.prune(retention_seconds=60) == 3


async def test_claim_uses_the_partial_index_with_a_large_backlog(queue: Queue) -> None:
    # 200,000 finished jobs and 50,000 scheduled for later around 100 ready ones.
    await execute(
        queue,
        "INSERT INTO {schema}.jobs (queue, status, payload, finished_at) "
        "SELECT 'test', 'succeeded', '{{}}', now() FROM generate_series(1, 200000)",
    )
    await execute(
        queue,
        "INSERT INTO {schema}.jobs (queue, payload, run_at) "
        "SELECT 'test', '{{}}', now() + interval '1 day' FROM generate_series(1, 50000)",
    )
    await queue.enqueue_many([{"ready": i} for i in range(100)])
    await execute(queue, "ANALYZE {schema}.jobs")
    plan = "\n".join(await _explain(queue))
    assert "jobs_claim_idx" in plan, plan
    assert "Seq Scan" not in plan, plan
    jobs = await queue.claim("w", 10, lease_seconds=30)
    assert len(jobs) == 10
    assert all("ready" in j.payload for j in jobs)


async def test_heartbeat_and_finish_find_rows_by_primary_key_with_a_large_backlog(
    queue: Queue,
) -> None:
    # 200,000 finished jobs and 20,000 running ones (other workers' leases): the
    # token fence implies status 'running', which must not lead the planner to the
    # partial index of running jobs (and its dead entries) instead of the primary key.
    await execute(
        queue,
        "INSERT INTO {schema}.jobs (queue, status, payload, finished_at) "
        "SELECT 'test', 'succeeded', '{{}}', now() FROM generate_series(1, 200000)",
    )
    await execute(
        queue,
        "INSERT INTO {schema}.jobs (queue, status, payload, attempt, lease_owner, lease_token, "
        "lease_expires_at) SELECT 'test', 'running', '{{}}', 1, 'other', gen_random_uuid(), "
        "now() + interval '1 hour' FROM generate_series(1, 20000)",
    )
    await queue.enqueue_many([{"mine": i} for i in range(20)])
    await execute(queue, "ANALYZE {schema}.jobs")
    jobs = await queue.claim("w", 20, lease_seconds=30)
    leases = [(j.id, j.lease_token or "") for j in jobs]
    async with queue.connection() as conn:
        cur = await conn.execute(
            b"EXPLAIN " + queue._sql["heartbeat"],
            {"ids": [i for i, _ in leases], "tokens": [t for _, t in leases], "lease": 30.0},
        )
        heartbeat = "\n".join(r[0] for r in await cur.fetchall())
        cur = await conn.execute(
            b"EXPLAIN " + queue._sql["finish"],
            {
                "outcomes": outcomes_json([succeed(j, stage=None, state=None) for j in jobs]),
                "keep_errors": 16,
                "channel": queue.channel,
                "done_channel": queue.done_channel,
            },
        )
        finish = "\n".join(r[0] for r in await cur.fetchall())
    for plan in (heartbeat, finish):
        assert "jobs_pkey" in plan, plan
        assert "jobs_running_lease_idx" not in plan and "Seq Scan on jobs" not in plan, plan
    assert await queue.heartbeat(leases, lease_seconds=30) == {t for _, t in leases}


async def test_finish_finds_rows_by_primary_key_when_statistics_saw_no_running_job(
    queue: Queue,
) -> None:
    # The table was analyzed while nothing ran (a backlog just enqueued), then a
    # worker claimed hundreds: the statistics put ~no row in the index of running
    # jobs, so a `status = 'running'` condition in finish would walk all of them for
    # every outcome (it did: finish cost grew with the concurrency).
    await queue.enqueue_many([{"i": i} for i in range(20000)])
    await execute(queue, "ANALYZE {schema}.jobs")
    jobs = await queue.claim("w", 500, lease_seconds=30)
    batch = jobs[:50]  # a worker's flush at concurrency 50
    leases = [(j.id, j.lease_token or "") for j in batch]
    async with queue.connection() as conn:
        cur = await conn.execute(
            b"EXPLAIN " + queue._sql["heartbeat"],
            {"ids": [i for i, _ in leases], "tokens": [t for _, t in leases], "lease": 30.0},
        )
        heartbeat = "\n".join(r[0] for r in await cur.fetchall())
        cur = await conn.execute(
            b"EXPLAIN " + queue._sql["finish"],
            {
                "outcomes": outcomes_json([succeed(j, stage=None, state=None) for j in batch]),
                "keep_errors": 16,
                "channel": queue.channel,
                "done_channel": queue.done_channel,
            },
        )
        finish = "\n".join(r[0] for r in await cur.fetchall())
    for plan in (heartbeat, finish):
        assert "jobs_pkey" in plan and "jobs_running_lease_idx" not in plan, plan
    written = await queue.finish([succeed(j, stage=None, state=None) for j in jobs])
    assert written == {j.lease_token for j in jobs}


async def _explain(queue: Queue) -> list[str]:
    """The plans of the worker's own claim statements, as they run: the general one
    and the one of a single queue without kinds or max_running."""
    lines = []
    async with queue.connection() as conn:
        cur = await conn.execute(
            b"EXPLAIN " + queue._sql["claim"],
            {
                "queues": ["test"],
                "rooms": [10],
                "caps": [None],
                "limit": 10,
                "owner": "w",
                "lease": 30.0,
            },
        )
        lines += [r[0] for r in await cur.fetchall()]
        cur = await conn.execute(
            b"EXPLAIN " + queue._sql["claim_one"],
            {"queue": "test", "limit": 10, "owner": "w", "lease": 30.0},
        )
        one = [r[0] for r in await cur.fetchall()]
    assert any("jobs_claim_idx" in line for line in one), one
    return lines + one


async def dead_rows(queue: Queue) -> int:
    [(n,)] = await execute(
        queue,
        "SELECT n_dead_tup FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'jobs'",
        queue.schema,
    )
    return int(n)


async def test_vacuum_runs_over_the_threshold_and_once_across_the_fleet(
    queue: Queue, make_config: Callable[..., WorkerConfig], pg_dsn: str
) -> None:
    await make_dead_rows(queue, 1500)

    idle = maintenance(queue, make_config(maintenance={"vacuum_dead_rows": 1_000_000}))
    assert await idle.vacuum() is None  # under its threshold

    metrics = ProcessingMetrics()
    worker = maintenance(queue, make_config(maintenance={"vacuum_dead_rows": 1000}), metrics)
    async with held_as_by_vacuum(queue, pg_dsn):  # this one skips rather than waits
        assert await worker.vacuum() is None
    assert await worker.vacuum() == 1500
    assert metrics.vacuums == 1
    [(last_vacuum,)] = await execute(
        queue,
        "SELECT last_vacuum FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'jobs'",
        queue.schema,
    )
    assert last_vacuum is not None
    off = maintenance(queue, make_config(maintenance={"vacuum_dead_rows": None}))
    assert await off.vacuum() is None


async def seq_scans(queue: Queue) -> int:
    """Sequential scans of the jobs table so far (this pool's one connection flushes
    its own counts first)."""
    async with queue.connection() as conn:
        await conn.execute("SELECT pg_stat_force_next_flush()")
        cur = await conn.execute(
            "SELECT seq_scan FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'jobs'",
            (queue.schema,),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def outcome_cycle(queue: Queue, n: int) -> int:
    """What a worker's connections run for n jobs: claim, heartbeat, finish."""
    jobs = await queue.claim("w1", n, lease_seconds=60)
    if jobs:
        await queue.heartbeat([(j.id, j.lease_token or "") for j in jobs], lease_seconds=60)
        assert len(await queue.finish([succeed(j, stage=None, state=None) for j in jobs])) == len(
            jobs
        )
    return len(jobs)


async def test_statements_planned_on_an_empty_table_find_rows_by_key_once_it_is_analyzed(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    # One connection, so its cached plans are the ones counted. psycopg prepares a
    # statement at its sixth run (prepare_threshold 5), and the server's plan of a
    # prepared statement is then its generic plan (its own choice after five more
    # runs, here at once), made on the table as it is now: nearly empty.
    config = make_config(
        database={"pool_min_size": 1, "pool_max_size": 1},
        maintenance={"analyze_growth_factor": 2},
    )
    await execute(queue, "ALTER TABLE {schema}.jobs SET (autovacuum_enabled = false)")
    async with Queue(config) as one:
        async with one.connection() as conn:
            await conn.execute("SET plan_cache_mode = force_generic_plan")
        for _ in range(8):
            await one.enqueue_many([{"i": 0}] * 3)
            await outcome_cycle(one, 3)
        await one.enqueue_many([{"i": i} for i in range(20_000)])
        before = await seq_scans(one)
        await outcome_cycle(one, 50)
        # Plans for an empty table: the outcome write reads all 20,000 rows for 50.
        assert await seq_scans(one) > before

        metrics = ProcessingMetrics()
        worker = maintenance(one, config, metrics)
        pages = await worker.analyze()
        assert pages is not None and pages >= 128
        assert metrics.analyzes == 1
        assert await worker.analyze() is None  # recorded at this size now

        before = await seq_scans(one)
        for _ in range(3):
            assert await outcome_cycle(one, 50) == 50
        assert await seq_scans(one) == before  # planned again: rows by primary key


async def test_analyze_waits_for_growth_since_the_recorded_size_and_skips_a_locked_table(
    queue: Queue, make_config: Callable[..., WorkerConfig], pg_dsn: str
) -> None:
    await execute(queue, "ALTER TABLE {schema}.jobs SET (autovacuum_enabled = false)")
    for bad in (float("nan"), 0.5, float("inf")):
        with pytest.raises(ValueError, match="growth"):
            await queue.analyze(growth=bad)
    metrics = ProcessingMetrics()
    worker = maintenance(queue, make_config(maintenance={"analyze_growth_factor": 3}), metrics)
    await queue.enqueue_many([{"i": i} for i in range(10)])
    assert await worker.analyze() is None  # a page: under the floor of 128
    await queue.enqueue_many([{"i": i} for i in range(10_000)])
    async with held_as_by_vacuum(queue, pg_dsn):  # skipped, not waited for
        assert await worker.analyze() is None
    pages = await worker.analyze()  # never analyzed (relpages 0) and over the floor
    assert pages is not None and pages >= 128
    assert metrics.analyzes == 1
    [(last_analyze,)] = await execute(
        queue,
        "SELECT last_analyze FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'jobs'",
        queue.schema,
    )
    assert last_analyze is not None
    assert await queue.table_pages() == (pages, pages)

    # Twice the pages is not three times; four times is.
    await queue.enqueue_many([{"i": i} for i in range(10_000)])
    assert await worker.analyze() is None
    await queue.enqueue_many([{"i": i} for i in range(20_000)])
    assert await worker.analyze() is not None
    assert metrics.analyzes == 2

    # A VACUUM elsewhere records the size (and makes every session plan again).
    eager = maintenance(queue, make_config(maintenance={"analyze_growth_factor": 1.1}))
    await queue.enqueue_many([{"i": i} for i in range(15_000)])  # 40,000 rows: 55,000
    now, recorded = await queue.table_pages()
    assert now >= 1.1 * recorded  # due...
    await execute(queue, "VACUUM {schema}.jobs")
    now, recorded = await queue.table_pages()
    assert recorded == now
    assert await eager.analyze() is None  # ...not any more
    assert metrics.analyzes == 2

    off = maintenance(queue, make_config(maintenance={"analyze_growth_factor": None}))
    await queue.enqueue_many([{"i": i} for i in range(15_000)])
    assert await off.analyze() is None
    assert await eager.analyze() is not None  # the control: due at 1.1 times


async def test_each_look_vacuums_when_due_and_otherwise_analyzes_when_due(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    await make_dead_rows(queue, 1500)  # autovacuum off on this table
    await queue.enqueue_many([{"i": i} for i in range(1000)])
    metrics = ProcessingMetrics()
    config = make_config(maintenance={"vacuum_dead_rows": 1000, "analyze_growth_factor": 2})
    worker = maintenance(queue, config, metrics)
    await worker.look_after_table()  # VACUUM (due), which records the size too
    assert (metrics.vacuums, metrics.analyzes) == (1, 0)
    await worker.look_after_table()
    assert (metrics.vacuums, metrics.analyzes) == (1, 0)
    await queue.enqueue_many([{"i": i} for i in range(10_000)])
    await worker.look_after_table()
    assert (metrics.vacuums, metrics.analyzes) == (1, 1)


@contextlib.asynccontextmanager
async def held_as_by_vacuum(queue: Queue, pg_dsn: str) -> AsyncIterator[None]:
    """The jobs table held as a VACUUM, ANALYZE or index rebuild elsewhere holds it."""
    async with await AsyncConnection.connect(pg_dsn) as other:
        await other.execute(
            sql.SQL("LOCK TABLE {}.jobs IN SHARE UPDATE EXCLUSIVE MODE").format(
                sql.Identifier(queue.schema)
            )
        )
        yield
        await other.rollback()


async def make_dead_rows(queue: Queue, n: int) -> None:
    async with queue.connection() as conn:
        # The server's autovacuum would clean them up if its visit fell in the test.
        await conn.execute(
            sql.SQL("ALTER TABLE {}.jobs SET (autovacuum_enabled = false)").format(
                sql.Identifier(queue.schema)
            )
        )
    await queue.enqueue_many([{"i": i} for i in range(n)])
    async with queue.connection() as conn:
        await conn.execute(sql.SQL("DELETE FROM {}.jobs").format(sql.Identifier(queue.schema)))
        await conn.execute("SELECT pg_stat_force_next_flush()")
    await wait_for(lambda: _at_least(queue, n), what="dead rows in the statistics")


async def _at_least(queue: Queue, n: int) -> bool:
    return await dead_rows(queue) >= n


async def test_a_role_that_does_not_own_the_table_leaves_it_to_autovacuum(
    queue: Queue,
    make_config: Callable[..., WorkerConfig],
    pg_dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await make_dead_rows(queue, 1500)
    role = f"wc_worker_{uuid.uuid4().hex[:8]}"
    ident, schema = sql.Identifier(role), sql.Identifier(queue.schema)
    async with await AsyncConnection.connect(pg_dsn, autocommit=True) as admin:
        try:
            await admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
        except psycopg.errors.InsufficientPrivilege:
            pytest.skip("the test database's role may not create roles")
        await admin.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, ident))
        await admin.execute(
            sql.SQL("GRANT SELECT, UPDATE ON ALL TABLES IN SCHEMA {} TO {}").format(schema, ident)
        )
        try:
            dsn = make_conninfo(pg_dsn, user=role, password="")
            config = make_config(database={"dsn": dsn}, maintenance={"vacuum_dead_rows": 1000})
            async with Queue(config) as limited:
                with pytest.raises(PermissionError, match="not the table's owner"):
                    await limited.vacuum(min_dead_rows=0)
                metrics = ProcessingMetrics()
                worker = maintenance(limited, config, metrics)
                with caplog.at_level("WARNING", logger="worker_core.worker"):
                    assert await worker.vacuum() is None
                    assert await worker.vacuum() is None  # no second query, no second line
                assert caplog.text.count("leaving it to autovacuum") == 1
                assert metrics.vacuums == 0
                with pytest.raises(PermissionError, match="not the table's owner"):
                    await limited.analyze(growth=1, min_pages=0)  # due now
                await queue.enqueue_many([{"i": i} for i in range(10_000)])
                with caplog.at_level("WARNING", logger="worker_core.worker"):
                    assert await worker.analyze() is None
                    assert await worker.analyze() is None
                assert caplog.text.count("not analyzing the jobs table") == 1
                assert metrics.analyzes == 0
        finally:
            await admin.execute(sql.SQL("DROP OWNED BY {}").format(ident))
            await admin.execute(sql.SQL("DROP ROLE {}").format(ident))


async def index_bytes(queue: Queue, index: str) -> int:
    [(n,)] = await execute(
        queue,
        "SELECT pg_relation_size(to_regclass(format('%%I.%%I', %s::text, %s::text)))",
        queue.schema,
        index,
    )
    return int(n)


async def test_the_claim_indexes_are_rebuilt_once_bloated_and_by_one_worker_at_a_time(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    # 40,000 jobs queued then finished: VACUUM empties the claim indexes' entries,
    # but their pages stay; 10 jobs are left queued.
    for _ in range(4):
        await queue.enqueue_many([{} for _ in range(10_000)])
    await execute(queue, "UPDATE {schema}.jobs SET status = 'cancelled', finished_at = now()")
    await queue.enqueue_many([{} for _ in range(10)])
    await execute(queue, "VACUUM {schema}.jobs")
    bloated = {i: await index_bytes(queue, i) for i in ("jobs_claim_idx", "jobs_claim_kind_idx")}
    assert all(n > 1 << 20 for n in bloated.values()), bloated

    off = maintenance(queue, make_config(maintenance={"reindex_claim_index_factor": None}))
    assert await off.reindex() == {}
    first = maintenance(queue, make_config())
    second = maintenance(queue, make_config())
    # Another worker's rebuild in progress (its lease row): this one does nothing.
    held, _ = await queue.take_lease("reindex_claim_index", "elsewhere", 60)
    assert held
    assert await first.reindex() == {}
    await queue.release_lease("reindex_claim_index", "elsewhere")

    # An interrupted rebuild's invalid copy, which every write would maintain.
    await execute(
        queue, "CREATE INDEX jobs_claim_idx_ccnew ON {schema}.jobs (id) WHERE status = 'queued'"
    )
    await execute(
        queue,
        "UPDATE pg_index SET indisvalid = false WHERE indexrelid = "
        "to_regclass(format('%%I.jobs_claim_idx_ccnew', %s::text))",
        queue.schema,
    )
    rebuilt = await first.reindex()
    assert set(rebuilt) == set(bloated)
    for index, (before, after) in rebuilt.items():
        assert before == bloated[index] and after < before // 4, (index, before, after)
        assert await index_bytes(queue, index) == after
    leftovers = await execute(
        queue,
        "SELECT count(*) FROM pg_class WHERE relname LIKE 'jobs_claim%%_cc%%' "
        "AND relnamespace = %s::regnamespace",
        queue.schema,
    )
    assert leftovers == [(0,)]
    assert await second.reindex() == {}  # small again: nothing to do
    assert await execute(queue, "SELECT count(*) FROM {schema}.leases") == [(0,)]
    jobs = await queue.claim("w", 20, lease_seconds=30)
    assert len(jobs) == 10  # the rebuilt index serves the claim


async def test_a_healthy_claim_index_of_a_table_never_analyzed_is_not_rebuilt(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    # A backlog enqueued just before the workers start: the index's reltuples still
    # says 0 (set when it was created on the empty table, never analyzed since), so
    # against it any index over the minimum looks bloated.
    await queue.enqueue_many([{} for _ in range(40_000)])
    [(reltuples,)] = await execute(
        queue,
        "SELECT reltuples FROM pg_class WHERE oid = to_regclass(format('%%I.jobs_claim_idx', %s::text))",
        queue.schema,
    )
    sizes = {i: await index_bytes(queue, i) for i in ("jobs_claim_idx", "jobs_claim_kind_idx")}
    assert reltuples <= 0 and all(n > 1 << 20 for n in sizes.values()), (reltuples, sizes)
    assert await maintenance(queue, make_config()).reindex() == {}  # counted: healthy
    assert {i: await index_bytes(queue, i) for i in sizes} == sizes
