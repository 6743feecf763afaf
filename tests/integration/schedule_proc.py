"""A process evaluating schedules on a fake clock, for the fleet test:
``python schedule_proc.py START STEPS``.

Reads WC_DSN and WC_SCHEMA. At wall-clock time ``START + i * PACE`` (so that every
process of the test ticks at once) it ticks the runner at fake time ``BASE + i *
20 s``, for i in 0..STEPS-1, then prints ``FIRED <n>``: the jobs this process enqueued.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from datetime import UTC, datetime, timedelta

from worker_core import Queue, Schedule, WorkerConfig
from worker_core.schedules import ScheduleRunner

BASE = datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)
PACE = 0.15


async def main(start: float, steps: int) -> None:
    config = WorkerConfig(
        environment="test",
        database={"dsn": os.environ["WC_DSN"], "schema": os.environ["WC_SCHEMA"]},
        queue={"name": "sched"},
    )
    schedule = Schedule("minutely", "* * * * *", {"task": "rescan"}, kind="rescan")
    fired = 0
    async with Queue(config) as queue:
        runner = ScheduleRunner([schedule], queue)
        for i in range(steps):
            await asyncio.sleep(max(0.0, start + i * PACE - time.time()))
            for item in await runner.tick(BASE + timedelta(seconds=20 * i)):
                fired += len(item.job_ids)
    print("FIRED", fired, flush=True)


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]), int(sys.argv[2])))
