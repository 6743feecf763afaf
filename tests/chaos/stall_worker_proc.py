"""A DocumentWorker process whose stages sometimes block the event loop past the
lease, for the stall-storm chaos test: ``python stall_worker_proc.py``.

Configuration as ``doc_worker_proc.py`` (WC_DSN, WC_SCHEMA, WC_STORAGE, WC_LEASE,
WC_CONCURRENCY), plus WC_STALL_SHARE (the share of stage runs that block) and
WC_STALL_SECONDS (how long they block). Each stage run is tracked per job: a run
of a job that starts while another run of the same job is active in this
process prints ``OVERLAP <job id> <attempt>`` (the test fails on any).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from doc_worker_proc import config_from_env

from worker_core import Stage, StageContext, configure_logging
from worker_core.ingest import DocumentWorker

SHARE = float(os.environ.get("WC_STALL_SHARE", "0.05"))
BLOCK = float(os.environ.get("WC_STALL_SECONDS", "3"))


def blocks(job_id: int, attempt: int, stage: str) -> bool:
    """Deterministic per (job, attempt, stage), and only in the first two attempts,
    so every job has attempts that do not block."""
    if attempt > 2:
        return False
    digest = hashlib.sha256(f"{job_id}:{attempt}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < SHARE


class Tracked:
    """Runs ``stage``; blocks the loop first for a share of runs; reports overlaps."""

    def __init__(self, stage: Stage, active: Counter[int]) -> None:
        self.name = stage.name
        self.timeout = getattr(stage, "timeout", None)
        self._stage = stage
        self._active = active

    async def run(self, ctx: StageContext) -> None:
        job = ctx.job
        self._active[job.id] += 1
        try:
            if self._active[job.id] > 1:
                print(f"OVERLAP {job.id} {job.attempt}", flush=True)
            if blocks(job.id, job.attempt, self.name):
                time.sleep(BLOCK)  # noqa: ASYNC251 -- a CPU-bound parse holding the loop
            await self._stage.run(ctx)
        finally:
            self._active[job.id] -= 1


class StallingWorker(DocumentWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.active: Counter[int] = Counter()

    def stages(self) -> list[Stage]:
        return [Tracked(stage, self.active) for stage in super().stages()]


async def main() -> None:
    configure_logging("WARNING", fmt="json")  # the watchdog's warnings, for the test to count
    worker = StallingWorker(config_from_env())
    print("READY", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main())
