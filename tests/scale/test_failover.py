"""A primary fails over to its streaming standby in the middle of a drain.

Four worker processes use one multi-host DSN (``host=a,b port=x,y
target_session_attrs=read-write``). Mid-run the primary is stopped hard
(``pg_ctl stop -m immediate``: a crash) and the standby promoted; every worker
must find the new primary by itself. With synchronous replication no
acknowledged write is lost and no job runs twice; with asynchronous replication
the commits of the last moments before the crash may be gone: the test measures
that window and shows its only effect is that those jobs run again
(docs/reliability.md, "Failover").
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest
from infra import (
    WorkerProcess,
    executions,
    free_port,
    install_oracle,
    report,
    verdict,
    wait_until,
    worker_env,
)
from psycopg import sql

from worker_core import Queue, WorkerConfig
from worker_core.embedded import EmbeddedPostgres

pytestmark = pytest.mark.slow

SCHEMA = "failover"


def _run(dsn: str, statement: str) -> None:
    """Run ``statement`` and reload the server's configuration."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement.encode())
        conn.execute("SELECT pg_reload_conf()")


def _one(dsn: str, query: str, *params: Any) -> Any:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(query.encode(), params or None).fetchone()
    return row[0] if row else None


async def _replayed(primary: EmbeddedPostgres, standby: EmbeddedPostgres) -> bool:
    lsn = await asyncio.to_thread(_one, primary.dsn, "SELECT pg_current_wal_lsn()::text")
    return bool(
        await asyncio.to_thread(
            _one, standby.dsn, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", lsn
        )
    )


async def _sync_state(primary: EmbeddedPostgres) -> str | None:
    value = await asyncio.to_thread(
        _one, primary.dsn, "SELECT string_agg(sync_state, ',') FROM pg_stat_replication"
    )
    return str(value) if value else None


def _transitions(dsn: str) -> set[tuple[int, int, str, int]]:
    """Every status change recorded on that server: (n, job, new status, attempt).
    ``n`` tells a change lost in the failover from the same change made again."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT n, job_id, new_status, attempt FROM {}.transitions").format(
                sql.Identifier(SCHEMA)
            )
        ).fetchall()
    return {(int(r[0]), int(r[1]), str(r[2]), int(r[3])) for r in rows}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("replication", ["synchronous", "asynchronous"])
async def test_failover_to_the_standby(
    replica_pair: tuple[EmbeddedPostgres, EmbeddedPostgres], replication: str
) -> None:
    primary, standby = replica_pair
    dsn = (
        f"host=127.0.0.1,127.0.0.1 port={primary.port},{standby.port} "
        "user=postgres dbname=postgres target_session_attrs=read-write"
    )
    config = WorkerConfig(
        environment="test",
        database={"dsn": dsn, "schema": SCHEMA, "connect_timeout": 2},
        queue={"name": "test"},
    )
    jobs = 2000
    async with Queue(config) as queue:
        await queue.migrate()
        async with queue.connection() as conn:
            await install_oracle(conn, SCHEMA)
        ids = await queue.enqueue_many([{"i": i, "sleep": {"fleet": 0.04}} for i in range(jobs)])
    # Every job exists on the standby before the run: what failover can take back
    # is then claims and outcomes only (enqueues have the same window; see the doc).
    await wait_until(lambda: _replayed(primary, standby), timeout=60, what="standby caught up")
    if replication == "synchronous":
        await asyncio.to_thread(
            _run, primary.dsn, "ALTER SYSTEM SET synchronous_standby_names = '*'"
        )
        await wait_until(
            lambda: _sync_state_is(primary, "sync"), timeout=30, what="standby synchronous"
        )
    else:
        assert await _sync_state(primary) == "async"

    env = worker_env(dsn, SCHEMA, lease=10, connect_timeout=2)
    fleet = list(await asyncio.gather(*(WorkerProcess.start("fleet", env) for _ in range(4))))
    try:
        await wait_until(
            lambda: sum(len(w.words("ACKED")) for w in fleet) >= jobs // 3,
            timeout=120,
            what="a third of the jobs done",
        )
        if replication == "asynchronous":
            # A standby that lags, as one across a busy WAN does: its WAL receiver is
            # pointed nowhere, so what the primary commits from now on never reaches
            # it. The loss window is then as long as the test wants, not luck.
            await asyncio.to_thread(
                _run, standby.dsn, "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=1'"
            )
            await wait_until(
                lambda: _sync_state_is(primary, None), timeout=30, what="standby cut off"
            )
            acked_now = sum(len(w.words("ACKED")) for w in fleet)
            await wait_until(
                lambda: sum(len(w.words("ACKED")) for w in fleet) >= acked_now + 100,
                timeout=60,
                what="outcomes only the primary has",
            )
        crashed = time.monotonic()
        await asyncio.to_thread(primary.stop, "immediate")
        await asyncio.to_thread(standby.promote)
        promoted = time.monotonic()

        async def all_succeeded() -> bool:
            try:
                done = await asyncio.to_thread(
                    _one,
                    standby.dsn,
                    sql.SQL("SELECT count(*) FROM {}.jobs WHERE status = 'succeeded'")
                    .format(sql.Identifier(SCHEMA))
                    .as_string(None),
                )
            except psycopg.OperationalError:
                return False
            return bool(done == jobs)

        await wait_until(all_succeeded, timeout=180, interval=0.2, what="every job succeeded")
        acks_after = [
            min((t for t, _ in w.words("ACKED") if t > promoted), default=None) for w in fleet
        ]
        assert all(t is not None for t in acks_after), "every worker reconnected by itself"
        first_ack = min(t for t in acks_after if t is not None)
        codes = [await w.stop() for w in fleet]
    finally:
        for w in fleet:
            await w.stop()
    assert codes == [0, 0, 0, 0]

    conn = await psycopg.AsyncConnection.connect(standby.dsn, autocommit=True)
    try:
        result = await verdict(conn, SCHEMA, ids)
    finally:
        await conn.close()
    new_history = await asyncio.to_thread(_transitions, standby.dsn)
    # The old primary, started alone on another port once every worker is gone
    # (restarting it where the workers can reach it would be split brain): what it
    # committed that the new primary never got is the failover's loss window.
    primary.port = free_port()
    await asyncio.to_thread(primary.start_again)
    old_history = await asyncio.to_thread(_transitions, primary.dsn)
    await asyncio.to_thread(primary.stop, "immediate")
    lost_commits = old_history - new_history

    acked = {(int(w[1]), int(w[2])) for p in fleet for _, w in p.words("ACKED")}
    runs = executions(fleet)
    re_executed = sum(1 for n in runs.values() if n > 1)
    new_succeeded = {
        (job, attempt) for _, job, status, attempt in new_history if status == "succeeded"
    }
    lost_and_acked = {
        (job, attempt) for _, job, status, attempt in lost_commits if status == "succeeded"
    } & acked
    # An outcome write in flight at the crash commits on the old primary (before its
    # wait for the standby) and never answers; the worker writes it again, now on the
    # new primary, and that second write is the one acknowledged. The job ran once.
    written_again = {
        (job, attempt)
        for job, attempt in lost_and_acked
        if runs[job] == 1 and (job, attempt) in new_succeeded
    }
    acked_then_lost = lost_and_acked - written_again
    report(
        f"failover {replication}",
        jobs=jobs,
        workers=4,
        faults="primary crash (immediate) + promote",
        lost=result.lost,
        duplicated_outcomes=result.duplicated,
        stuck=result.stuck,
        re_executed=re_executed,
        commits_lost_in_failover=len(lost_commits),
        acknowledged_outcomes_lost=len(acked_then_lost),
        in_flight_outcomes_written_again=len(written_again),
        recover_s=first_ack - crashed,
        promote_s=promoted - crashed,
    )
    result.assert_clean()
    assert set(runs) == set(ids)
    if replication == "asynchronous":
        # The window is real, and its only effect is that those jobs ran again.
        assert acked_then_lost
        for job, attempt in acked_then_lost:
            assert runs[job] >= 2, (job, attempt)
    if replication == "synchronous":
        # Nothing a worker was told is durable was lost, so nothing ran twice; a
        # commit only the old primary has was in flight at the crash: never
        # acknowledged there, at most written again on the new primary.
        assert acked_then_lost == set()
        assert acked <= new_succeeded, sorted(acked - new_succeeded)[:10]
        assert re_executed == 0


async def _sync_state_is(primary: EmbeddedPostgres, state: str | None) -> bool:
    return await _sync_state(primary) == state
