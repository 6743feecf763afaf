"""Stall storm: DocumentWorker processes whose stages, a share of the time, block
the event loop past the lease (a CPU-bound parse, a sync client call), while a
driver SIGKILLs a random process about every second and starts a replacement.

Every job must succeed within a fair number of attempts (blocking happens only in
a job's first two attempts; kills and neighbours' stalls cost a few more), no job
may ever run twice at once inside one process (a stale run and a newer claim of
the same job), and the chunks table must hold exactly the expected rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from psycopg import sql
from test_kill_chaos import check_alive, document

from worker_core import Queue
from worker_core.ingest import Chunker
from worker_core.testing import wait_for

PROC = Path(__file__).with_name("stall_worker_proc.py")
DOCUMENTS = 300
PROCESSES = 3
MIN_KILLS = 10
LEASE = 2.0
#: Attempts a job may need: two that may block, plus kills and neighbours' stalls.
FAIR_ATTEMPTS = 7


def spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, str(PROC)], env=env, stdout=out,
                                stderr=out)  # fmt: skip


@pytest.mark.timeout(400)
async def test_stall_storm_with_sigkills_runs_every_job_once_at_a_time(
    queue: Queue, pg_dsn: str, tmp_path: Path
) -> None:
    storage = tmp_path / "docs"
    storage.mkdir()
    chunker = Chunker(600, 60)
    expected: dict[tuple[str, int], str] = {}
    payloads = []
    for i in range(DOCUMENTS):
        text = document(i)
        (storage / f"d{i}.txt").write_text(text, encoding="utf-8")
        for chunk in chunker.split(text):
            expected[(f"doc-{i}", chunk.index)] = hashlib.md5(chunk.text.encode()).hexdigest()
        payloads.append({"document_id": f"doc-{i}", "key": f"d{i}.txt"})
    await queue.enqueue_many(payloads, queue="docs")
    env = {**os.environ, "WC_DSN": pg_dsn, "WC_SCHEMA": queue.schema, "WC_STORAGE": str(storage),
           "WC_LEASE": str(LEASE), "WC_CONCURRENCY": "4", "WC_STALL_SHARE": "0.04",
           "WC_STALL_SECONDS": str(LEASE * 1.5)}  # fmt: skip
    rng = random.Random(20261201)
    log = tmp_path / "workers.log"
    procs = [spawn(env, log) for _ in range(PROCESSES)]
    kills = 0
    started = time.monotonic()
    try:
        while kills < MIN_KILLS and time.monotonic() - started < 200:
            await asyncio.sleep(rng.uniform(0.6, 1.4))
            check_alive(procs, log)
            victim = rng.randrange(PROCESSES)
            procs[victim].send_signal(signal.SIGKILL)
            await asyncio.to_thread(procs[victim].wait, 10)
            kills += 1
            procs[victim] = spawn(env, log)
        await wait_for(lambda: _done(queue, DOCUMENTS), timeout=240, interval=0.5,
                       what="every document ingested")  # fmt: skip
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    stats = await queue.stats("docs")
    async with queue.connection() as conn:
        ident = sql.Identifier(queue.schema)
        cur = await conn.execute(
            sql.SQL(
                "SELECT document_id, chunk_index, md5(content), embedding IS NOT NULL FROM {}.chunks"
            ).format(ident)
        )
        rows = await cur.fetchall()
        cur = await conn.execute(sql.SQL("SELECT attempt, errors FROM {}.jobs").format(ident))
        jobs = await cur.fetchall()
    stored = {(r[0], r[1]): r[2] for r in rows}
    missing = len(set(expected) - set(stored))
    extra = len(set(stored) - set(expected))
    duplicated = len(rows) - len(stored)
    wrong = sum(1 for k, v in stored.items() if k in expected and expected[k] != v)
    unembedded = sum(1 for r in rows if not r[3])
    attempts = Counter(attempt for attempt, _ in jobs)
    rescued = sum(1 for _, errors in jobs for e in errors if e["type"] == "LeaseExpired")
    output = log.read_text(errors="replace")
    overlaps = [line for line in output.splitlines() if line.startswith("OVERLAP")]
    stalls = output.count("event loop blocked")
    print(
        f"\n[stall storm] documents={DOCUMENTS} processes={PROCESSES} kills={kills} "
        f"stall_warnings={stalls} elapsed={time.monotonic() - started:.1f}s "
        f"succeeded={stats['succeeded']} running={stats['running']} dead={stats['dead']} "
        f"attempts={dict(sorted(attempts.items()))} lease_expired_records={rescued} "
        f"overlaps={len(overlaps)} chunks={len(rows)} expected={len(expected)} lost={missing} "
        f"duplicated={duplicated} unexpected={extra} wrong_content={wrong} "
        f"unembedded={unembedded}"
    )
    assert kills >= MIN_KILLS
    assert stalls > 0 and rescued > 0  # the storm happened: loops blocked, leases lost
    assert stats == {"queued": 0, "running": 0, "succeeded": DOCUMENTS, "dead": 0,
                     "cancelled": 0}  # fmt: skip
    assert max(attempts) <= FAIR_ATTEMPTS, attempts
    assert overlaps == []
    assert (missing, duplicated, extra, wrong, unembedded) == (0, 0, 0, 0, 0)


async def _done(queue: Queue, n: int) -> bool:
    return (await queue.stats("docs"))["succeeded"] == n
