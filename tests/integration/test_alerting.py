"""Alert rules against a real PostgreSQL and a local webhook receiver: each rule fires
once and resolves once, one evaluator at a time, retries, the gauge, a worker's loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from psycopg import sql

from worker_core import BaseWorker, PermanentError, Queue, StageContext
from worker_core.alerts import AlertEvaluator
from worker_core.config import WorkerConfig
from worker_core.metrics import MetricsCollector, ProcessingMetrics
from worker_core.testing import running, wait_for


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records JSON bodies (and can fail on cue)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.fail_next = 0
        self.arrived = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        if self.fail_next:
            self.fail_next -= 1
            return web.Response(status=503)
        self.bodies.append(await request.json())
        self.arrived.set()
        return web.Response(status=204)

    def take(self) -> list[tuple[str, str, str]]:
        out = [(b["alert"], b["status"], b["queue"]) for b in self.bodies]
        self.bodies.clear()
        return out


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook/{secret}", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook/s3cr3t-path"
    try:
        yield rec
    finally:
        await runner.cleanup()


def alerts_config(make_config: Callable[..., WorkerConfig], url: str, **rules: Any) -> WorkerConfig:
    return make_config(alerts={"webhook_url": url, "interval": 0.05, "resolve_after": 0,
                               "webhook_retries": 1, "webhook_timeout": 2, **rules})  # fmt: skip


async def _exec(queue: Queue, text: str, *args: Any) -> None:
    async with queue.connection() as conn:
        await conn.execute(sql.SQL(text).format(s=sql.Identifier(queue.schema)), args)


class Bad:
    name = "bad"

    async def run(self, ctx: StageContext) -> None:
        raise PermanentError("no")


class BadWorker(BaseWorker):
    def stages(self) -> list[Any]:
        return [Bad()]


async def make_dead(queue: Queue, config: WorkerConfig) -> int:
    job_id = await queue.enqueue({"x": 1})
    # A worker without alert rules: the evaluators under test are the first to see it.
    quiet = config.model_copy(update={"alerts": type(config.alerts)()})
    await BadWorker(quiet).run(until_empty=True, install_signal_handlers=False)
    return job_id


Setup = Callable[[Queue, WorkerConfig], Awaitable[Callable[[], Awaitable[None]]]]


async def dead_letters(queue: Queue, config: WorkerConfig) -> Callable[[], Awaitable[None]]:
    job_id = await make_dead(queue, config)

    async def clear() -> None:
        assert await queue.discard([job_id]) == 1

    return clear


async def oldest_ready(queue: Queue, config: WorkerConfig) -> Callable[[], Awaitable[None]]:
    job_id = await queue.enqueue({"x": 1}, run_at=-5)  # ready for 5 s already

    async def clear() -> None:
        assert await queue.cancel(job_id)

    return clear


async def breaker_open(queue: Queue, config: WorkerConfig) -> Callable[[], Awaitable[None]]:
    await _exec(queue, "INSERT INTO {s}.breakers (name, state, failures, opened_at, reopen_at) "
                "VALUES ('test', 'open', 5, now() - interval '5 s', now() + interval '1 h')")  # fmt: skip

    async def clear() -> None:
        await _exec(queue, "UPDATE {s}.breakers SET state = 'closed', reopen_at = NULL")

    return clear


async def no_workers(queue: Queue, config: WorkerConfig) -> Callable[[], Awaitable[None]]:
    await queue.enqueue({"x": 1}, run_at=-5)

    async def clear() -> None:
        await queue.register_worker({"id": "w", "host": "h", "pid": 1, "version": "v",
                                     "queues": ["test"], "kinds": None, "concurrency": 1,
                                     "in_flight": 0, "lease": 60})  # fmt: skip

    return clear


async def failure_ratio(queue: Queue, config: WorkerConfig) -> Callable[[], Awaitable[None]]:
    minute = int(time.time() // 60 * 60)
    await queue.record_history([(minute, "test", "default", "", 1, 3, 3, 0, 0, 1.0, [4])])

    async def clear() -> None:
        await queue.record_history([(minute, "test", "default", "", 20, 0, 0, 0, 0, 1.0, [20])])

    return clear


RULES: dict[str, tuple[Setup, dict[str, Any]]] = {
    "dead_letters": (dead_letters, {"threshold": 0, "window": 300}),
    "oldest_ready_seconds": (oldest_ready, {"threshold": 1}),
    "breaker_open_seconds": (breaker_open, {"threshold": 1}),
    "no_workers_seconds": (no_workers, {"threshold": 1}),
    "failure_ratio": (failure_ratio, {"threshold": 0.5, "window": 600, "min_count": 2}),
}


@pytest.mark.parametrize("rule", sorted(RULES))
async def test_each_rule_fires_once_and_resolves_once(
    rule: str, make_config: Callable[..., WorkerConfig], receiver: Receiver
) -> None:
    setup, settings = RULES[rule]
    config = alerts_config(make_config, receiver.url, **{rule: settings})
    async with Queue(config) as queue:
        await queue.migrate()
        evaluator = AlertEvaluator(config.alerts, "evaluator-1", secrets=config.secrets())
        assert await evaluator.tick(queue) == []  # nothing yet
        clear = await setup(queue, config)
        fired = await evaluator.tick(queue)
        assert [(n.alert, n.status, n.queue) for n in fired] == [(rule, "firing", "test")]
        (body,) = receiver.bodies
        assert body["value"] > body["threshold"] == settings["threshold"]
        assert body["text"].startswith(f"[FIRING] {rule}:")
        assert receiver.take() == [(rule, "firing", "test")]
        assert await evaluator.tick(queue) == [] and receiver.take() == []  # once
        await clear()
        assert [n.status for n in await evaluator.tick(queue)] == ["resolved"]
        assert receiver.take() == [(rule, "resolved", "test")]
        assert await evaluator.tick(queue) == [] and receiver.take() == []  # once


def holds(evaluator: AlertEvaluator) -> bool:
    """Whether ``evaluator`` holds the alerts lease (a call: mypy keeps no narrowing)."""
    return evaluator.held


async def test_one_evaluator_at_a_time_and_no_repeat_after_handover(
    make_config: Callable[..., WorkerConfig], receiver: Receiver
) -> None:
    config = alerts_config(make_config, receiver.url, dead_letters={"threshold": 0})
    async with Queue(config) as queue:
        await queue.migrate()
        await make_dead(queue, config)
        first = AlertEvaluator(config.alerts, "w1")
        second = AlertEvaluator(config.alerts, "w2")
        results = await asyncio.gather(first.tick(queue), second.tick(queue))
        assert sorted(len(r) for r in results) == [0, 1]
        assert receiver.take() == [("dead_letters", "firing", "test")]
        holder, other = (first, second) if first.held else (second, first)
        assert not holds(other)
        await holder.release(queue)
        assert await other.tick(queue) == [] and holds(other)  # took over, fires nothing again
        assert receiver.take() == []


async def test_a_failing_webhook_is_retried_at_the_next_evaluation(
    make_config: Callable[..., WorkerConfig], receiver: Receiver
) -> None:
    config = alerts_config(make_config, receiver.url, dead_letters={"threshold": 0})
    async with Queue(config) as queue:
        await queue.migrate()
        await make_dead(queue, config)
        evaluator = AlertEvaluator(config.alerts, "w1")
        receiver.fail_next = 2  # the first try and its one retry
        assert await evaluator.tick(queue) == []
        assert receiver.take() == []
        assert [n.status for n in await evaluator.tick(queue)] == ["firing"]
        assert receiver.take() == [("dead_letters", "firing", "test")]
        assert await evaluator.tick(queue) == []


async def test_hold_time_keeps_a_cleared_alert_firing(
    make_config: Callable[..., WorkerConfig], receiver: Receiver
) -> None:
    config = make_config(alerts={"webhook_url": receiver.url, "resolve_after": 3600,
                                 "dead_letters": {"threshold": 0}})  # fmt: skip
    async with Queue(config) as queue:
        await queue.migrate()
        job_id = await make_dead(queue, config)
        evaluator = AlertEvaluator(config.alerts, "w1")
        await evaluator.tick(queue)
        await queue.discard([job_id])
        for _ in range(3):
            assert await evaluator.tick(queue) == []
        assert receiver.take() == [("dead_letters", "firing", "test")]
        (state,) = await queue.alert_states()
        assert state["status"] == "resolving"


async def test_the_gauge_follows_the_stored_state(
    make_config: Callable[..., WorkerConfig], receiver: Receiver
) -> None:
    config = alerts_config(make_config, receiver.url, dead_letters={"threshold": 0})
    async with Queue(config) as queue:
        await queue.migrate()
        job_id = await make_dead(queue, config)
        evaluator = AlertEvaluator(config.alerts, "w1")
        collector = MetricsCollector(ProcessingMetrics(queue="test"), queue=queue)
        await evaluator.tick(queue)
        assert await collector.refresh()
        line = 'worker_core_alert_firing{alert="dead_letters",queue="test"}'
        assert f"{line} 1.0" in collector.render()
        await queue.discard([job_id])
        await evaluator.tick(queue)
        await collector.refresh()
        assert f"{line} 0.0" in collector.render()


async def test_a_running_worker_evaluates_and_posts(
    make_config: Callable[..., WorkerConfig], receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    config = alerts_config(make_config, receiver.url, dead_letters={"threshold": 0})
    async with Queue(config) as queue:
        await queue.migrate()
        await queue.enqueue({"x": 1})
        async with running(BadWorker(config)):
            await asyncio.wait_for(receiver.arrived.wait(), 20)
        assert receiver.take() == [("dead_letters", "firing", "test")]
        # The worker handed the lease back when it stopped.
        assert (await queue.take_lease("alerts", "someone-else", 10))[0] is True
    assert "s3cr3t-path" not in caplog.text


async def test_the_prometheus_rules_use_exported_metrics(
    make_config: Callable[..., WorkerConfig], receiver: Receiver
) -> None:
    import re
    from pathlib import Path

    rules = (Path(__file__).parents[2] / "docs/prometheus/worker_core_alerts.yml").read_text()
    names = set(re.findall(r"\b(worker_core_[a-z_]+)", rules))
    config = alerts_config(make_config, receiver.url, dead_letters={"threshold": 0})
    async with Queue(config) as queue:
        await queue.migrate()
        await make_dead(queue, config)
        await AlertEvaluator(config.alerts, "w1").tick(queue)
        worker = BadWorker(config)
        await queue.enqueue({"x": 2})
        async with running(worker):

            async def started() -> bool:
                return worker.snapshot().last_claim_at is not None

            await wait_for(started, what="the worker claiming")
            assert worker.breaker("embed") is not None
            collector = worker.metrics.collector(worker=worker)
            assert await collector.refresh()
            exported = {line.split("{")[0].split(" ")[0] for line in collector.render().splitlines()
                        if line and not line.startswith("#")}  # fmt: skip
    assert len(names) >= 6
    assert names <= exported, names - exported
