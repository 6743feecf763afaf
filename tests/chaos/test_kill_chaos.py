"""SIGKILL chaos: DocumentWorker processes ingest thousands of documents while a
driver kills a random one about every second and starts a replacement.

Then every job must have succeeded, none may be left running, and the chunks
table must hold exactly the expected rows: none missing, none twice, every one
embedded, with the expected content. The short version runs in CI (>= 20 kills);
``WORKER_CORE_CHAOS_LONG=1`` runs the long one.
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
from pathlib import Path

import pytest
from psycopg import sql

from worker_core import Queue
from worker_core.ingest import Chunker
from worker_core.testing import wait_for

PROC = Path(__file__).with_name("doc_worker_proc.py")
LONG = os.environ.get("WORKER_CORE_CHAOS_LONG") == "1"
DOCUMENTS = 30_000 if LONG else 8_000
MIN_KILLS = 100 if LONG else 20
PROCESSES = 3
_WORDS = [
    "lease",
    "fence",
    "stage",
    "chunk",
    "embed",
    "retry",
    "rescue",
    "commit",
    "vacuum",
    "index",
    "queue",
    "batch",
]


def document(i: int) -> str:
    rng = random.Random(i)
    paragraphs = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(40, 160)))
                  for _ in range(rng.randint(2, 6))]  # fmt: skip
    return f"Document {i}\n\n" + "\n\n".join(paragraphs) + "\n"


def spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen([sys.executable, str(PROC)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip


def check_alive(procs: list[subprocess.Popen[bytes]], log: Path) -> None:
    """A worker that exits by itself is a bug, not chaos: fail with its last words."""
    for proc in procs:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            pytest.fail(f"a worker process exited by itself ({proc.returncode}):\n{tail}")


# The loop below bounds itself (killing for at most 250 s, then 120 s to finish);
# the timeout sits above that, so a slow machine fails an assertion, not a timeout.
@pytest.mark.timeout(1000 if LONG else 420)
async def test_sigkill_chaos_loses_and_duplicates_nothing(
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
    jobs = len(payloads)
    env = {**os.environ, "WC_DSN": pg_dsn, "WC_SCHEMA": queue.schema, "WC_STORAGE": str(storage),
           "WC_LEASE": "2", "WC_CONCURRENCY": "1"}  # fmt: skip
    rng = random.Random(20261128)
    log = tmp_path / "workers.log"
    procs = [spawn(env, log) for _ in range(PROCESSES)]
    kills = 0
    started = time.monotonic()
    try:
        while kills < MIN_KILLS or not await _done(queue, jobs):
            await asyncio.sleep(rng.uniform(0.6, 1.4))  # the chaos driver's own rhythm
            if await _done(queue, jobs):
                if kills >= MIN_KILLS:
                    break
                # Out of work before enough kills: re-ingest a wave of documents, which
                # must write nothing new, so the kills keep landing on busy workers.
                wave = rng.sample(payloads, min(len(payloads), 3000))
                await queue.enqueue_many(wave, queue="docs")
                jobs += len(wave)
            check_alive(procs, log)
            victim = rng.randrange(PROCESSES)
            procs[victim].send_signal(signal.SIGKILL)
            await asyncio.to_thread(procs[victim].wait, 10)
            kills += 1
            procs[victim] = spawn(env, log)
            if time.monotonic() - started > (800 if LONG else 250):
                break
        await wait_for(lambda: _done(queue, jobs), timeout=120, interval=0.5,
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
        cur = await conn.execute(
            sql.SQL(
                "SELECT document_id, chunk_index, md5(content), embedding IS NOT NULL "
                "FROM {}.chunks"
            ).format(sql.Identifier(queue.schema))
        )
        rows = await cur.fetchall()
        cur = await conn.execute(
            sql.SQL("SELECT count(*) FROM {}.documents").format(sql.Identifier(queue.schema))
        )
        documents = (await cur.fetchone() or [0])[0]
    stored = {(r[0], r[1]): r[2] for r in rows}
    missing = len(set(expected) - set(stored))
    extra = len(set(stored) - set(expected))
    duplicated = len(rows) - len(stored)
    wrong = sum(1 for k, v in stored.items() if k in expected and expected[k] != v)
    unembedded = sum(1 for r in rows if not r[3])
    print(
        f"\n[sigkill chaos] documents={DOCUMENTS} jobs={jobs} processes={PROCESSES} kills={kills} "
        f"elapsed={time.monotonic() - started:.1f}s succeeded={stats['succeeded']} "
        f"running={stats['running']} queued={stats['queued']} dead={stats['dead']} "
        f"chunks={len(rows)} expected={len(expected)} lost={missing} duplicated={duplicated} "
        f"unexpected={extra} wrong_content={wrong} unembedded={unembedded} "
        f"documents_recorded={documents}"
    )
    assert kills >= MIN_KILLS
    assert stats == {"queued": 0, "running": 0, "succeeded": jobs, "dead": 0,
                     "cancelled": 0}  # fmt: skip
    assert (missing, duplicated, extra, wrong, unembedded) == (0, 0, 0, 0, 0)
    assert documents == DOCUMENTS


async def _done(queue: Queue, n: int) -> bool:
    return (await queue.stats("docs"))["succeeded"] == n
