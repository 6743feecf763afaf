"""Rolling deploys: SIGTERM worker processes again and again under load.

Jobs in flight finish within the shutdown timeout or are released without losing
an attempt; so every job ends succeeded with exactly one attempt used.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from psycopg import sql

from worker_core import Queue
from worker_core.testing import wait_for

PROC_WORKER = Path(__file__).parents[1] / "integration" / "proc_worker.py"


def spawn(pg_dsn: str, schema: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "WC_DSN": pg_dsn,
        "WC_SCHEMA": schema,
        "WC_SLEEP": "0.3",
        "WC_SHUTDOWN": "0.15",
        "WC_LEASE": "5",
        "WC_CONCURRENCY": "6",
    }
    return subprocess.Popen(
        [sys.executable, str(PROC_WORKER), "sleep"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.timeout(240)
async def test_repeated_sigterm_loses_no_attempt(queue: Queue, pg_dsn: str) -> None:
    jobs = 120
    ids = await queue.enqueue_many([{"i": i} for i in range(jobs)])
    procs = [spawn(pg_dsn, queue.schema) for _ in range(2)]
    terms, exit_codes = 0, []
    started = time.monotonic()
    try:
        for round_ in range(8):
            victim = procs[round_ % 2]
            # Signal only once the victim itself has jobs in flight: before its
            # signal handlers are installed, SIGTERM kills it by default (no job
            # is held then, but the exit code would not show a graceful drain).
            await wait_for(
                functools.partial(_holds_lease, queue, victim.pid),
                timeout=30,
                what="victim holds jobs",
            )
            victim.send_signal(signal.SIGTERM)
            exit_codes.append(await asyncio.to_thread(victim.wait, 30))
            terms += 1
            procs[round_ % 2] = spawn(pg_dsn, queue.schema)
        await wait_for(
            lambda: _finished(queue, jobs), timeout=120, interval=0.2, what="all jobs succeeded"
        )
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    attempts = [job.attempt for job in [await queue.get(i) for i in ids] if job]
    stats = await queue.stats()
    print(
        f"\n[deploys] jobs={jobs} sigterms={terms} elapsed={time.monotonic() - started:.1f}s "
        f"exit_codes={sorted(set(exit_codes))} succeeded={stats['succeeded']} "
        f"running={stats['running']} attempts_lost={sum(a - 1 for a in attempts)}"
    )
    assert exit_codes == [0] * terms
    assert stats["succeeded"] == jobs
    assert stats["running"] == 0
    assert set(attempts) == {1}


async def _holds_lease(queue: Queue, pid: int) -> bool:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {}.jobs WHERE status = 'running' AND lease_owner LIKE %s"
            ).format(sql.Identifier(queue.schema)),
            (f"%:{pid}:%",),
        )
        row = await cur.fetchone()
    return bool(row and row[0])


async def _finished(queue: Queue, jobs: int) -> bool:
    return (await queue.stats())["succeeded"] == jobs
