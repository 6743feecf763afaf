"""queue.max_running on a real PostgreSQL: a fleet-wide cap, race-free across processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from worker_core import JobStatus, Queue, WorkerConfig
from worker_core.outcomes import succeed

PROC = Path(__file__).with_name("jobmodel_proc.py")


def _spawn(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(PROC), "capped"], stdout=subprocess.PIPE, text=True, env=env
    )


async def _running(queue: Queue, name: str) -> int:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT count(*) FROM {}.jobs WHERE queue = %s AND status = 'running'").format(
                sql.Identifier(queue.schema)
            ),
            (name,),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_concurrent_claims_never_pass_the_cap(
    make_config: Callable[..., WorkerConfig],
) -> None:
    config = make_config(
        queue={"name": ["capped", "free"], "max_running": {"capped": 4}},
        database={"pool_max_size": 16},
    )
    async with Queue(config) as queue:
        await queue.migrate()
        await queue.enqueue_many([{"i": i} for i in range(60)], queue="capped")
        await queue.enqueue_many([{"i": i} for i in range(30)], queue="free")
        running: list[Any] = []
        for round_ in range(4):
            # Twelve claims at once, on twelve connections, each wanting 5 jobs.
            batches = await asyncio.gather(
                *(queue.claim(f"w{i}", 5, lease_seconds=30) for i in range(12))
            )
            capped = [job for batch in batches for job in batch if job.queue == "capped"]
            # Exactly the free slots were taken: all 4 at first, then the 2 freed.
            assert len(capped) == (4 if round_ == 0 else 2), f"round {round_}"
            assert await _running(queue, "capped") == 4, f"round {round_}"
            running += capped
            # Two of the capped jobs end: two slots free up for the next round.
            done, running = running[:2], running[2:]
            assert len(await queue.finish([succeed(j, stage=None, state=None) for j in done])) == 2
        # The uncapped queue gave what was asked, whatever the cap of the other.
        assert (await queue.stats("free"))["running"] == 30


async def test_a_scalar_cap_applies_to_each_queue(
    make_config: Callable[..., WorkerConfig],
) -> None:
    config = make_config(queue={"name": ["a", "b"], "max_running": 2})
    async with Queue(config) as queue:
        await queue.migrate()
        for name in ("a", "b"):
            await queue.enqueue_many([{}] * 5, queue=name)
        jobs = await queue.claim("w", 10, lease_seconds=30)
        assert sorted(j.queue for j in jobs) == ["a", "a", "b", "b"]
        assert await queue.claim("w2", 10, lease_seconds=30) == []


@pytest.mark.timeout(120)
async def test_three_processes_stay_within_the_cap(
    make_config: Callable[..., WorkerConfig], pg_dsn: str, schema: str
) -> None:
    cap, jobs = 3, 24
    config = make_config(queue={"name": "capped"})
    async with Queue(config) as queue:
        await queue.migrate()
        async with queue.connection() as conn:
            probe = sql.SQL("{}.probe").format(sql.Identifier(schema))
            await conn.execute(sql.SQL("CREATE TABLE {} (n int, peak int)").format(probe))
            await conn.execute(sql.SQL("INSERT INTO {} VALUES (0, 0)").format(probe))
        ids = await queue.enqueue_many([{"i": i} for i in range(jobs)])
        env = {**os.environ, "WC_DSN": pg_dsn, "WC_SCHEMA": schema,
               "WC_MAX_RUNNING": str(cap), "WC_CONCURRENCY": "4"}  # fmt: skip
        procs = [_spawn(env) for _ in range(3)]
        try:
            outs = await asyncio.gather(
                *(asyncio.to_thread(p.communicate, timeout=90) for p in procs)
            )
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        assert [p.returncode for p in procs] == [0, 0, 0]
        done = [int(out.split()[-1]) for out, _ in outs]
        assert sum(done) == jobs
        async with queue.connection() as conn:
            cur = await conn.execute(sql.SQL("SELECT n, peak FROM {}").format(probe))
            row: Any = await cur.fetchone()
        # 12 slots across the processes, never more than 3 jobs at once; and the cap
        # is reached, so it is the cap that held them back.
        assert row == (0, cap)
        for job_id in ids:
            job = await queue.get(job_id)
            assert job is not None and job.status is JobStatus.SUCCEEDED
