"""A fleet of worker processes behind a real PgBouncer in transaction mode.

What breaks through a transaction pooler, and what worker_core does about it:
psycopg's automatic prepared statements (each transaction may run on another
server connection: "prepared statement _pg3_0 does not exist"; PgBouncer < 1.21
cannot carry them) are turned off on every connection that is recognised as
pooled; LISTEN through the pooler would be accepted and then never deliver a
notification, so the worker polls instead, or LISTENs on `database.listen_dsn`,
which must reach the server directly. Session state is not used: `SET LOCAL` and
transaction-level advisory locks only (tests/unit/test_pooler_safe_sql.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import psycopg
import pytest
from infra import (
    PgBouncer,
    WorkerProcess,
    executions,
    install_oracle,
    report,
    verdict,
    wait_until,
    worker_env,
)

from worker_core import Queue, SyncQueue, WorkerConfig

pytestmark = pytest.mark.slow


async def test_prepared_statements_are_off_behind_pgbouncer(
    pgbouncer: PgBouncer, make_config: Callable[..., WorkerConfig], schema: str
) -> None:
    # The failure being avoided: a statement prepared on one server connection,
    # used again while another client holds that connection.
    first = await psycopg.AsyncConnection.connect(pgbouncer.dsn, autocommit=True)
    second = await psycopg.AsyncConnection.connect(pgbouncer.dsn, autocommit=True)
    try:
        await first.execute("SELECT 1", prepare=True)
        async with second.transaction():  # takes the server connection first just left
            await second.execute("SELECT 1")
            with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                await first.execute("SELECT 1", prepare=True)
    finally:
        await first.close()
        await second.close()

    pooled = make_config(database={"dsn": pgbouncer.dsn, "schema": schema})
    async with Queue(pooled) as queue:
        assert pooled.database.prepare_threshold == 5
        await queue.migrate()  # a transaction-level advisory lock and SET LOCAL: fine
        # Many more statements than the prepare threshold, from many connections at once.
        ids = await asyncio.gather(*(queue.enqueue({"i": i}) for i in range(200)))
        jobs = await asyncio.gather(*(queue.get(i) for i in ids))
        assert [job.payload["i"] for job in jobs if job] == list(range(200))
        async with queue.connection() as conn:
            assert conn.prepare_threshold is None

    def from_a_thread() -> list[int]:  # SyncQueue, as a web app would use it
        with SyncQueue(pooled) as sync:
            ids = [sync.enqueue({"sync": i}) for i in range(50)]
            with sync.connection() as conn:
                assert conn.prepare_threshold is None
            return [job.payload["sync"] for i in ids if (job := sync.get(i))]

    assert await asyncio.to_thread(from_a_thread) == list(range(50))
    async with (
        Queue(make_config(database={"schema": schema})) as direct,
        direct.connection() as conn,
    ):
        assert conn.prepare_threshold == 5  # a direct connection keeps them


async def drain_behind_pgbouncer(
    name: str,
    pgbouncer: PgBouncer,
    queue: Queue,
    env: dict[str, str],
    *,
    jobs: int = 2000,
    workers: int = 4,
) -> tuple[list[WorkerProcess], float]:
    """Drain ``jobs`` with ``workers`` processes; PgBouncer crashes and comes back
    once mid-run. Returns the workers (still running) and the recovery time."""
    async with queue.connection() as conn:
        await install_oracle(conn, queue.schema)
    ids = await queue.enqueue_many([{"i": i, "sleep": {"fleet": 0.02}} for i in range(jobs)])
    fleet = await asyncio.gather(*(WorkerProcess.start("fleet", env) for _ in range(workers)))
    started = time.monotonic()
    servers_seen = clients_seen = 0

    async def done_at_least(n: int) -> bool:
        nonlocal servers_seen, clients_seen
        pools = await asyncio.to_thread(pgbouncer.pools)
        servers_seen = max(servers_seen, pools.get("sv_active", 0) + pools.get("sv_idle", 0))
        clients_seen = max(clients_seen, pools.get("cl_active", 0) + pools.get("cl_waiting", 0))
        return (await queue.stats())["succeeded"] >= n

    await wait_until(lambda: done_at_least(jobs // 3), timeout=120, what="a third done")
    crashed = time.monotonic()
    await asyncio.to_thread(pgbouncer.kill)
    await asyncio.to_thread(pgbouncer.start)
    acked_before = sum(len(w.words("ACKED")) for w in fleet)
    await wait_until(
        lambda: sum(len(w.words("ACKED")) for w in fleet) > acked_before,
        timeout=60,
        what="outcomes written through the restarted PgBouncer",
    )
    recovered = time.monotonic() - crashed
    await wait_until(lambda: done_at_least(jobs), timeout=180, interval=0.2, what="all done")
    elapsed = time.monotonic() - started
    async with queue.connection() as conn:
        result = await verdict(conn, queue.schema, ids)
    runs = executions(fleet)
    report(
        name,
        jobs=jobs,
        workers=workers,
        faults="1 PgBouncer crash+restart",
        lost=result.lost,
        duplicated_outcomes=result.duplicated,
        stuck=result.stuck,
        re_executed=sum(1 for n in runs.values() if n > 1),
        recover_s=recovered,
        elapsed_s=elapsed,
        client_connections_max=clients_seen,
        server_connections_max=servers_seen,
        pool_size=pgbouncer.pool_size,
        pgbouncer=pgbouncer.version(),
    )
    result.assert_clean()
    assert set(runs) == set(ids)
    assert all(w.words("ACKED") for w in fleet), "every worker processed jobs"
    # 4 workers x (concurrency + a few) client connections through `pool_size` servers.
    assert servers_seen <= pgbouncer.pool_size
    return fleet, recovered


async def _stop_all(fleet: list[WorkerProcess]) -> list[int]:
    return list(await asyncio.gather(*(w.stop() for w in fleet)))


@pytest.mark.timeout(300)
async def test_fleet_through_pgbouncer_listens_directly(
    pgbouncer: PgBouncer, queue: Queue, pg_dsn: str
) -> None:
    # A long poll interval: only NOTIFY can wake an idle worker quickly.
    env = worker_env(pgbouncer.dsn, queue.schema, listen_dsn=pg_dsn, poll=5, lease=5)
    fleet, _ = await drain_behind_pgbouncer("pgbouncer+listen_dsn", pgbouncer, queue, env)
    try:
        for worker in fleet:
            assert worker.logs("connection pooler detected: prepared statements are off")
            assert not worker.logs("LISTEN is off"), "listen_dsn is direct: LISTEN is on"
        # The fleet is idle now; a new job wakes it through LISTEN, not the 5 s poll.
        enqueued = time.monotonic()
        job_id = await queue.enqueue({"i": -1})
        wake = await _wake_latency(fleet, job_id, enqueued)
        report("pgbouncer+listen_dsn wake-up", seconds=wake, poll_interval=5.0)
        assert wake < 2.5
    finally:
        assert await _stop_all(fleet) == [0] * len(fleet)


async def _wake_latency(fleet: list[WorkerProcess], job_id: int, enqueued: float) -> float:
    async def seen() -> float | None:
        times = [t for w in fleet for t, words in w.words("RAN") if words[1] == str(job_id)]
        return min(times) - enqueued if times else None

    await wait_until(seen, timeout=30, what=f"job {job_id} started")
    value = await seen()
    assert value is not None
    return value


@pytest.mark.timeout(300)
async def test_fleet_through_pgbouncer_polls_without_listen_dsn(
    pgbouncer: PgBouncer, queue: Queue
) -> None:
    env = worker_env(pgbouncer.dsn, queue.schema, poll=0.2, lease=5)
    fleet, _ = await drain_behind_pgbouncer("pgbouncer polling only", pgbouncer, queue, env)
    try:
        for worker in fleet:
            # One clear line at start-up: LISTEN is not tried through the pooler.
            warnings = worker.logs("LISTEN is off")
            assert warnings, worker.lines[-5:]
            assert "listen_dsn" in warnings[0]["event"] + str(warnings[0])
    finally:
        assert await _stop_all(fleet) == [0] * len(fleet)


async def test_listen_dsn_through_pgbouncer_is_refused(
    pgbouncer: PgBouncer, queue: Queue, pg_dsn: str
) -> None:
    env = worker_env(pg_dsn, queue.schema, listen_dsn=pgbouncer.dsn)
    worker = await WorkerProcess.start("refused", env)
    code = await asyncio.wait_for(worker.proc.wait(), 60)
    await worker.stop()
    text = "\n".join(line for _, line in worker.lines)
    assert code != 0
    assert "listen_dsn" in text and "pooler" in text, text[-2000:]
