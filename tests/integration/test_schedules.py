"""Schedules on a real PostgreSQL: one job per slot across workers and processes,
missed slots after downtime, the worker's wiring and ``worker-core schedules``."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from worker_core import BaseWorker, Queue, Schedule, StageContext, WorkerConfig
from worker_core.cli import main
from worker_core.schedules import ScheduleRunner, slot_key

T0 = datetime(2030, 1, 1, 10, 0, 30, tzinfo=UTC)
HERE = Path(__file__).parent


async def scheduled_jobs(queue: Queue) -> list[dict[str, Any]]:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT id, queue, kind, payload, dedupe_key FROM {}.jobs ORDER BY id").format(
                sql.Identifier(queue.schema)
            )
        )
        keys = ["id", "queue", "kind", "payload", "dedupe_key"]
        return [dict(zip(keys, row, strict=True)) for row in await cur.fetchall()]


async def test_a_slot_fires_once_with_the_job_it_describes(queue: Queue) -> None:
    schedule = Schedule("rescan", "0 * * * *", {"bucket": "docs"}, kind="rescan", queue="scans")
    runner = ScheduleRunner([schedule], queue)
    assert await runner.tick(T0) == []  # first sight: the schedule starts now
    assert await runner.tick(T0 + timedelta(minutes=20)) == []
    slot = datetime(2030, 1, 1, 11, tzinfo=UTC)
    (fired,) = await runner.tick(slot + timedelta(seconds=1))
    assert (fired.name, fired.slots) == ("rescan", (slot,))
    assert await runner.tick(slot + timedelta(seconds=2)) == []
    (job,) = await scheduled_jobs(queue)
    assert job == {
        "id": fired.job_ids[0],
        "queue": "scans",
        "kind": "rescan",
        "payload": {"bucket": "docs"},
        "dedupe_key": slot_key("rescan", slot),
    }
    assert runner.next_slot == slot + timedelta(hours=1)
    (row,) = await runner._store.rows()
    assert (row["last_slot"], row["last_job_id"]) == (slot, fired.job_ids[0])


async def test_many_runners_racing_on_one_slot_fire_it_once(config: WorkerConfig) -> None:
    schedule = Schedule("race", "*/5 * * * *", {}, missed="all")
    queues = [Queue(config) for _ in range(6)]
    try:
        for q in queues:
            await q.open()
        await queues[0].migrate()
        runners = [ScheduleRunner([schedule], q) for q in queues]
        await asyncio.gather(*(r.tick(T0) for r in runners))
        # At 10:25:30 the slots 10:15, 10:20 and 10:25 are due (missed="all").
        for minutes, due in ((5, 1), (10, 1), (25, 3)):
            now = T0 + timedelta(minutes=minutes)
            results = await asyncio.gather(*(r.tick(now) for r in runners))
            assert sum(len(f.job_ids) for fired in results for f in fired) == due
        jobs = await scheduled_jobs(queues[0])
        keys = [j["dedupe_key"] for j in jobs]
        assert keys == [
            slot_key("race", T0.replace(second=0) + timedelta(minutes=m))
            for m in (5, 10, 15, 20, 25)
        ]
    finally:
        for q in queues:
            await q.close()


def test_three_processes_enqueue_exactly_one_job_per_slot(pg_dsn: str, schema: str) -> None:
    async def migrate() -> None:
        config = WorkerConfig(database={"dsn": pg_dsn, "schema": schema})
        async with Queue(config) as queue:
            await queue.migrate()

    asyncio.run(migrate())
    env = {**os.environ, "WC_DSN": pg_dsn, "WC_SCHEMA": schema}
    start = time.time() + 3.0  # every process ticks the same fake times at once
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "schedule_proc.py"), str(start), "10"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    fired = [int(out.split()[-1]) for out, _ in outputs]
    assert sum(fired) == 3  # fake times 00:00:30 .. 00:03:30: slots 00:01, 00:02, 00:03

    async def jobs() -> list[dict[str, Any]]:
        config = WorkerConfig(database={"dsn": pg_dsn, "schema": schema})
        async with Queue(config) as queue:
            return await scheduled_jobs(queue)

    found = asyncio.run(jobs())
    assert [j["dedupe_key"] for j in found] == [
        slot_key("minutely", datetime(2030, 1, 1, 0, m, tzinfo=UTC)) for m in (1, 2, 3)
    ]
    assert {j["kind"] for j in found} == {"rescan"}


@pytest.mark.parametrize(
    ("missed", "expected"),
    [
        ("latest", [15]),
        ("all", [13, 14, 15]),
        ("skip", []),
    ],
)
async def test_missed_slots_after_downtime(queue: Queue, missed: str, expected: list[int]) -> None:
    schedule = Schedule("hourly", "0 * * * *", {}, missed=missed, max_catch_up=3)
    runner = ScheduleRunner([schedule], queue)
    await runner.tick(T0)  # 10:00:30: the schedule starts, then every worker is down
    await runner.tick(T0.replace(hour=15, minute=30))
    slots = [datetime(2030, 1, 1, h, tzinfo=UTC) for h in expected]
    assert [j["dedupe_key"] for j in await scheduled_jobs(queue)] == [
        slot_key("hourly", s) for s in slots
    ]
    # Back to normal: the next slot fires on time whatever the policy.
    (fired,) = await runner.tick(datetime(2030, 1, 1, 16, 0, 1, tzinfo=UTC))
    assert fired.slots == (datetime(2030, 1, 1, 16, tzinfo=UTC),)


async def test_the_database_clock_is_used_without_a_fake_one(queue: Queue) -> None:
    runner = ScheduleRunner([Schedule("s", "* * * * * *", {})], queue)  # every second
    await runner.tick()
    assert runner.last_tick is not None
    assert abs((runner.last_tick - datetime.now(UTC)).total_seconds()) < 5
    assert 0 < runner.seconds_to_next() <= 1.01
    with pytest.raises(ValueError, match="timezone-aware"):
        await runner.tick(datetime(2030, 1, 1))


class Record:
    name = "record"

    def __init__(self, done: list[int], enough: asyncio.Event) -> None:
        self.done, self.enough = done, enough

    async def run(self, ctx: StageContext) -> None:
        self.done.append(ctx.job.id)
        if len(self.done) >= 3:
            self.enough.set()


class EverySecond(BaseWorker):
    done: list[int] = []
    enough = asyncio.Event()

    def stages(self) -> list[Any]:
        return [Record(self.done, self.enough)]

    def schedules(self) -> list[Schedule]:
        return [Schedule("tick", "* * * * * *", {"n": 1}, kind="tick")]


async def test_two_running_workers_fire_each_slot_once(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    workers = [EverySecond(make_config()) for _ in range(2)]
    done: list[int] = []
    enough = asyncio.Event()
    for worker in workers:
        worker.done, worker.enough = done, enough
    runs = [asyncio.create_task(w.run(install_signal_handlers=False)) for w in workers]
    await asyncio.wait_for(enough.wait(), 20)
    for worker in workers:
        await worker.stop()
    await asyncio.gather(*runs)
    jobs = await scheduled_jobs(queue)
    keys = [j["dedupe_key"] for j in jobs]
    assert len(keys) >= 3
    assert len(set(keys)) == len(keys)  # one job per slot, not one per worker
    slots = sorted(datetime.fromisoformat(k.split(":", 2)[2]) for k in keys)
    assert all((b - a) == timedelta(seconds=1) for a, b in itertools.pairwise(slots))
    assert {j["kind"] for j in jobs} == {"tick"}


class BadSchedules(EverySecond):
    def schedules(self) -> list[Schedule]:
        return [Schedule("a", "* * * * *", {}), Schedule("a", "0 * * * *", {})]


async def test_a_bad_schedule_list_stops_the_worker_at_start(config: WorkerConfig) -> None:
    with pytest.raises(ValueError, match="two schedules are named 'a'"):
        await BadSchedules(config).run(install_signal_handlers=False)


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdin=io.StringIO(), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_lists_schedules_with_their_next_runs() -> None:
    code, out, err = cli("schedules", "tests.integration.cli_workers:Scheduled", "--count", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (
        "nightly: '0 2 * * *' in Europe/Paris, kind 'prune' on queue 'default', "
        "missed slots: latest"
    )
    assert lines[1].startswith("  ") and lines[1].endswith(("T02:00:00+01:00", "T02:00:00+02:00"))
    assert len(lines) == 1 + 2 + 1 + 2
    code, out, _ = cli("schedules", "tests.integration.cli_workers:Scheduled", "--json")
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["nightly", "hourly"]
    assert rows[1]["queue"] == "scans" and len(rows[1]["next_runs"]) == 5
    code, out, err = cli("schedules", "tests.integration.cli_workers:Echo")
    assert (code, out) == (0, "tests.integration.cli_workers:Echo has no schedules\n")
    code, out, err = cli("schedules", "tests.integration.cli_workers:BadlyScheduled")
    assert code == 1
    assert err == (
        "worker-core schedules: tests.integration.cli_workers:BadlyScheduled: "
        "schedule 'x': unknown timezone 'Nowhere/Town'\n"
    )


def test_a_payload_over_the_queue_limit_is_refused_at_start(
    make_config: Callable[..., WorkerConfig],
) -> None:
    queue = Queue(make_config(queue={"max_payload_bytes": 1024}))
    big = Schedule("big", "0 * * * *", {"blob": "x" * 2000})
    with pytest.raises(ValueError, match="schedule 'big': payload is 2,011 bytes, over the limit"):
        ScheduleRunner([big], queue)
