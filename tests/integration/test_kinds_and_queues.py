"""Job kinds routed by pipelines() and several queues per worker, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from psycopg import sql

from worker_core import BaseWorker, JobStatus, Queue, StageContext, WorkerConfig
from worker_core.testing import running, wait_for_status


class Record:
    """Appends (worker, kind, queue, job id) to a shared list; shared between kinds."""

    name = "record"

    def __init__(self, seen: list[tuple[str, str, str, int]], who: str) -> None:
        self.seen, self.who = seen, who

    async def run(self, ctx: StageContext) -> None:
        self.seen.append((self.who, ctx.job.kind, ctx.job.queue, ctx.job.id))
        ctx.state.setdefault("by", []).append(self.who)


class Finish:
    name = "finish"

    async def run(self, ctx: StageContext) -> None:
        ctx.state["finished"] = ctx.job.kind


def kind_worker(seen: list[tuple[str, str, str, int]], who: str, *kinds: str) -> type[BaseWorker]:
    shared = Record(seen, who)

    class KindWorker(BaseWorker):
        def pipelines(self) -> dict[str, list[Any]]:
            # Every kind shares the same stage objects.
            return {kind: [shared, Finish()] for kind in kinds}

    return KindWorker


async def test_two_kinds_are_routed_to_the_two_workers_that_each_know_one(
    queue: Queue, config: WorkerConfig
) -> None:
    seen: list[tuple[str, str, str, int]] = []
    embeds = await queue.enqueue_many([{"i": i} for i in range(6)], kind="embed")
    rescans = await queue.enqueue_many([{"i": i} for i in range(6)], kind="rescan")
    others = [await queue.enqueue({"i": 0}, kind="unknown")]
    a = kind_worker(seen, "a", "embed")(config)
    b = kind_worker(seen, "b", "rescan")(config)
    await asyncio.gather(
        a.run(until_empty=True, install_signal_handlers=False),
        b.run(until_empty=True, install_signal_handlers=False),
    )
    assert sorted(i for w, k, _, i in seen if w == "a") == embeds
    assert {k for w, k, _, _ in seen if w == "a"} == {"embed"}
    assert sorted(i for w, k, _, i in seen if w == "b") == rescans
    assert {k for w, k, _, _ in seen if w == "b"} == {"rescan"}
    for job_id in embeds + rescans:
        job = await queue.get(job_id)
        assert job is not None and job.status is JobStatus.SUCCEEDED
        assert job.state["finished"] == job.kind
    # A kind no running worker knows waits for one that does.
    (waiting,) = [await queue.get(i) for i in others]
    assert waiting is not None and waiting.status is JobStatus.QUEUED and waiting.attempt == 0


async def test_a_stages_worker_runs_every_kind(queue: Queue, config: WorkerConfig) -> None:
    seen: list[tuple[str, str, str, int]] = []

    class Every(BaseWorker):
        def stages(self) -> list[Any]:
            return [Record(seen, "every")]

    ids = [await queue.enqueue({}, kind=k) for k in ("a", "b", "default")]
    await Every(config).run(until_empty=True, install_signal_handlers=False)
    assert sorted(i for *_, i in seen) == ids


async def test_pipelines_are_called_after_on_startup_and_checked(
    queue: Queue, config: WorkerConfig
) -> None:
    calls: list[str] = []

    class Ordered(BaseWorker):
        async def on_startup(self) -> None:
            calls.append("startup")

        def pipelines(self) -> dict[str, list[Any]]:
            calls.append("pipelines")
            return {"x": [Finish()]}

    await Ordered(config).run(until_empty=True, install_signal_handlers=False)
    assert calls == ["startup", "pipelines"]

    for bad, error, message in [
        ({}, ValueError, "no kinds"),
        ([Finish()], TypeError, "must return a dict"),
        ({"": [Finish()]}, ValueError, "must not be blank"),
        ({"x\x00": [Finish()]}, ValueError, "control characters"),
        ({"x": []}, ValueError, r"pipelines\(\)\['x'\]: stages\(\) returned no stages"),
        ({"x": [Finish(), Finish()]}, ValueError, r"\['x'\]: two stages are named"),
    ]:

        class Bad(BaseWorker):
            def pipelines(self, bad: Any = bad) -> Any:
                return bad

        with pytest.raises(error, match=message):
            await Bad(config).run(until_empty=True, install_signal_handlers=False)


def test_a_worker_needs_stages_or_pipelines() -> None:
    class Nothing(BaseWorker):
        pass

    with pytest.raises(TypeError, match="must define stages\\(\\) or pipelines\\(\\)"):
        Nothing(WorkerConfig())


# -- several queues -----------------------------------------------------------------
async def test_a_worker_claims_from_every_queue_by_priority_then_run_at(
    make_config: Callable[..., WorkerConfig],
) -> None:
    config = make_config(queue={"name": ["docs", "images", "audio"], "concurrency": 1})
    seen: list[tuple[str, str, str, int]] = []

    class Many(BaseWorker):
        def stages(self) -> list[Any]:
            return [Record(seen, "w")]

    async with Queue(config) as queue:
        await queue.migrate()
        first = await queue.enqueue({"n": 1})  # the first name is the default
        assert (await queue.get(first)).queue == "docs"  # type: ignore[union-attr]
        urgent = await queue.enqueue({"n": 2}, queue="audio", priority=5)
        older = await queue.enqueue({"n": 3}, queue="images", run_at=-60)
        elsewhere = await queue.enqueue({"n": 4}, queue="video")
        await Many(config).run(until_empty=True, install_signal_handlers=False)
        assert [i for *_, i in seen] == [urgent, older, first]
        assert (await queue.get(elsewhere)).status is JobStatus.QUEUED  # type: ignore[union-attr]
        assert (await queue.depth())["ready"] == 0  # the worker's three queues
        assert (await queue.depth("video"))["ready"] == 1


async def test_per_queue_concurrency_bounds_one_queue_not_the_others(
    make_config: Callable[..., WorkerConfig],
) -> None:
    config = make_config(
        queue={"name": ["slow", "fast"], "concurrency": 6, "queue_concurrency": {"slow": 2}}
    )
    gate = asyncio.Event()
    running_now: dict[str, int] = {"slow": 0, "fast": 0}
    peak: dict[str, int] = {"slow": 0, "fast": 0}

    class Hold:
        name = "hold"

        async def run(self, ctx: StageContext) -> None:
            running_now[ctx.job.queue] += 1
            peak[ctx.job.queue] = max(peak[ctx.job.queue], running_now[ctx.job.queue])
            try:
                await gate.wait()
            finally:
                running_now[ctx.job.queue] -= 1

    class Capped(BaseWorker):
        def stages(self) -> list[Any]:
            return [Hold()]

    async with Queue(config) as queue:
        await queue.migrate()
        slow = await queue.enqueue_many([{}] * 5, queue="slow", priority=9)
        fast = await queue.enqueue_many([{}] * 5, queue="fast")
        worker = Capped(config)
        async with running(worker):
            for _ in range(200):
                if running_now["slow"] + running_now["fast"] == 6:
                    break
                await asyncio.sleep(0.02)
            # The slow queue's jobs come first (priority 9) but only 2 run at once;
            # the other 4 slots go to the fast queue.
            assert running_now == {"slow": 2, "fast": 4}
            gate.set()
            for job_id in slow + fast:
                await wait_for_status(queue, job_id, JobStatus.SUCCEEDED)
        assert peak == {"slow": 2, "fast": 4}


def test_queue_settings_for_several_queues() -> None:
    from pydantic import ValidationError

    def config(**queue: Any) -> WorkerConfig:
        return WorkerConfig(queue=queue)

    settings = config(name=["a", "b"], max_running={"b": 3}).queue
    assert settings.names == ("a", "b") and settings.primary == "a"
    assert (settings.cap("a"), settings.cap("b")) == (None, 3)
    assert config(max_running=2).queue.cap("default") == 2
    bad: dict[str, Any]
    for bad in (
        {"name": []},
        {"name": ["a", "a"]},
        {"name": ["a", " "]},
        {"name": ["a\x00"]},
        {"name": ["x" * 201]},
        {"name": [str(i) for i in range(65)]},
        {"name": ["a"], "queue_concurrency": {"b": 1}},
        {"name": ["a"], "queue_concurrency": {"a": 0}},
        {"name": ["a"], "max_running": {"b": 1}},
        {"max_running": 0},
        {"max_running": -1},
        {"max_running": 10**7},
    ):
        with pytest.raises(ValidationError):
            config(**bad)


def test_queue_names_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CORE_QUEUE__NAME", '["docs", "images"]')
    monkeypatch.setenv("WORKER_CORE_QUEUE__MAX_RUNNING", '{"images": 2}')
    settings = WorkerConfig().queue
    assert settings.names == ("docs", "images") and settings.cap("images") == 2
    monkeypatch.delenv("WORKER_CORE_QUEUE__MAX_RUNNING")
    monkeypatch.setenv("WORKER_CORE_QUEUE__NAME", "1")  # one name, never parsed as a number
    assert WorkerConfig().queue.names == ("1",)


# -- the claim stays an index scan --------------------------------------------------
async def _plan(queue: Queue, name: str, params: dict[str, Any]) -> str:
    """The plan of named query ``name`` (EXPLAIN without ANALYZE: nothing runs)."""
    async with queue.connection() as conn:
        cur = await conn.execute(b"EXPLAIN (FORMAT JSON) " + queue._sql[name], params)
        row = await cur.fetchone()
    assert row is not None
    return json.dumps(row[0])


def _scans(plan: str) -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("Relation Name") == "jobs":
                found.append((node["Node Type"], node.get("Index Name")))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(plan))
    return found


@pytest.mark.parametrize("kinds", [None, ["embed"], ["embed", "rescan"]])
async def test_the_claim_is_an_index_scan_with_queues_kinds_pause_and_cap(
    make_config: Callable[..., WorkerConfig], kinds: list[str] | None
) -> None:
    config = make_config(queue={"name": ["a", "b"], "max_running": {"b": 5}})
    async with Queue(config) as queue:
        await queue.migrate()
        for name in ("a", "b"):
            for kind in ("embed", "rescan", "bulk"):
                await queue.enqueue_many([{"i": i} for i in range(3000)], queue=name, kind=kind)
        await queue.pause("b")
        async with queue.connection() as conn:
            await conn.execute(sql.SQL("ANALYZE {}.jobs").format(sql.Identifier(queue.schema)))
        params: dict[str, Any] = {
            "queues": ["a", "b"], "rooms": [10, 10], "caps": [None, 5], "limit": 10,
            "owner": "w", "lease": 30.0,
        }  # fmt: skip
        name = "claim"
        if kinds is not None:
            params["kinds"] = kinds
            name = "claim_kinds"
        plan = await _plan(queue, name, params)
        scans = _scans(plan)
        expected = "jobs_claim_idx" if kinds is None else "jobs_claim_kind_idx"
        assert ("Index Scan", expected) in scans, scans
        assert all(node != "Seq Scan" for node, _ in scans), scans
        assert "Sort" not in {n for n, _ in scans}
        # What the plan promises, the claim does: 10 jobs of queue a (b is paused).
        claimed = await queue.claim("w", 10, lease_seconds=30, kinds=kinds)
        assert len(claimed) == 10 and {j.queue for j in claimed} == {"a"}
        assert kinds is None or {j.kind for j in claimed} <= set(kinds)
