"""The KEDA query of docs/operations.md counts what it says, on a real schema."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from worker_core import Queue
from worker_core.outcomes import succeed

DOC = Path(__file__).parents[2] / "docs" / "operations.md"


def keda_query() -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    for block in blocks:
        for doc in yaml.safe_load_all(block):
            if doc and doc.get("kind") == "ScaledObject":
                return str(doc["spec"]["triggers"][0]["metadata"]["query"])
    raise AssertionError("no ScaledObject in docs/operations.md")


async def test_keda_query_counts_ready_and_running_jobs(queue: Queue) -> None:
    query = keda_query().replace("worker_core.jobs", f'"{queue.schema}".jobs')
    await queue.enqueue_many([{"i": i} for i in range(5)], queue="documents")
    await queue.enqueue({"later": True}, queue="documents", run_at=3600)  # not ready
    await queue.enqueue({"other": True}, queue="elsewhere")  # another queue
    # Three of the ready ones are claimed, and one of those finishes.
    claimed = await queue.claim("w", 3, lease_seconds=60, queue="documents")
    assert len(claimed) == 3
    assert await queue.finish([succeed(claimed[0], stage=None, state=None)])
    async with queue.connection() as conn:
        cur = await conn.execute(query)
        row = await cur.fetchone()
    assert row is not None
    assert row[0] == 4  # 2 ready + 2 running; not the scheduled, finished or other-queue ones
