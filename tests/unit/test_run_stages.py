"""worker_core.testing.run_stages: stages in process, a real StageContext, no database."""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
from typing import Any

import pytest

from worker_core import (
    CircuitOpenError,
    CircuitState,
    PermanentError,
    StageContext,
    TransientError,
    WorkerConfig,
    configure_logging,
)
from worker_core.errors import PayloadError
from worker_core.logs import unconfigure_logging
from worker_core.testing import arun_stages, run_stages


class Parse:
    name = "parse"

    async def run(self, ctx: StageContext) -> None:
        text = ctx.job.payload.get("text")
        if not text:
            raise PermanentError("empty document")
        ctx.state["words"] = text.split()


class Count:
    name = "count"

    async def run(self, ctx: StageContext) -> None:
        ctx.state["n"] = len(ctx.state["words"])
        ctx.logger.info("counted", n=ctx.state["n"])


def test_returns_the_final_state() -> None:
    assert run_stages([Parse(), Count()], {"text": "hello big world"}) == {
        "words": ["hello", "big", "world"],
        "n": 3,
    }


def test_the_stage_error_propagates_unchanged() -> None:
    with pytest.raises(PermanentError, match="empty document"):
        run_stages([Parse(), Count()], {"text": ""})


def test_state_and_attempt_set_up_a_retried_job() -> None:
    seen: dict[str, Any] = {}

    class Look:
        name = "look"

        async def run(self, ctx: StageContext) -> None:
            seen.update(attempt=ctx.job.attempt, state=dict(ctx.state), stage=ctx.stage)

    assert run_stages([Look()], {}, state={"cursor": 7}, attempt=3) == {"cursor": 7}
    assert seen == {"attempt": 3, "state": {"cursor": 7}, "stage": "look"}
    with pytest.raises(ValueError, match="attempt"):
        run_stages([Look()], {}, attempt=0)


def test_payload_and_state_go_through_json_as_in_the_table() -> None:
    seen: list[Any] = []

    class Look:
        name = "look"

        async def run(self, ctx: StageContext) -> None:
            seen.append(ctx.job.payload["pair"])

    run_stages([Look()], {"pair": (1, 2)})
    assert seen == [[1, 2]]  # a tuple comes back from jsonb as a list
    with pytest.raises(PayloadError, match="nan"):
        run_stages([Look()], {"x": float("nan")})

    class Poison:
        name = "poison"

        async def run(self, ctx: StageContext) -> None:
            ctx.state["bad"] = {1, 2}

    with pytest.raises(PayloadError, match="state after stage 'poison'"):
        run_stages([Poison()], {})


def test_connection_without_one_is_a_clear_error() -> None:
    class Query:
        name = "query"

        async def run(self, ctx: StageContext) -> None:
            async with ctx.connection():
                pass

    with pytest.raises(RuntimeError, match="pass connection="):
        run_stages([Query()], {})


def test_checkpoint_records_nothing_but_checks_the_state() -> None:
    class Long:
        name = "long"

        async def run(self, ctx: StageContext) -> None:
            ctx.state["cursor"] = 1
            await ctx.checkpoint()
            ctx.state["cursor"] = "\ud800"
            await ctx.checkpoint()

    with pytest.raises(PayloadError, match="surrogate"):
        run_stages([Long()], {})


def test_breakers_and_metrics_are_real() -> None:
    config = WorkerConfig(circuit_breaker={"fail_max": 2, "reset_timeout": 60})
    outcomes: list[str] = []

    async def flaky() -> None:
        raise ConnectionError("down")

    class Call:
        name = "call"

        async def run(self, ctx: StageContext) -> None:
            breaker = ctx.breaker("ocr")
            for _ in range(3):
                try:
                    await breaker.call(flaky)
                except CircuitOpenError:
                    outcomes.append("open")
                except ConnectionError:
                    outcomes.append("failed")
            assert breaker.state is CircuitState.OPEN
            assert ctx.breaker("ocr") is breaker
            raise TransientError("service down")

    class Report:
        name = "report"

        async def run(self, ctx: StageContext) -> None:
            ctx.state["stages"] = ctx.metrics.summary()["stages"]

    with pytest.raises(TransientError):
        run_stages([Call()], {}, config=config)
    assert outcomes == ["failed", "failed", "open"]
    state = run_stages([Parse(), Report()], {"text": "a"})
    assert state["stages"]["parse"]["completed"] == 1


def _square(n: int) -> tuple[int, int]:
    return n * n, os.getpid()


def test_offload_runs_in_a_thread_and_in_a_process() -> None:
    class Heavy:
        name = "heavy"

        async def run(self, ctx: StageContext) -> None:
            ctx.state["thread"] = await ctx.offload(lambda: threading.current_thread().name)
            ctx.state["square"], ctx.state["pid"] = await ctx.offload(_square, 7, process=True)

    state = run_stages([Heavy()], {}, config=WorkerConfig(queue={"offload_processes": 1}))
    assert state["thread"] != threading.current_thread().name
    assert state["square"] == 49 and state["pid"] != os.getpid()


def test_log_lines_carry_the_job_and_stage() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    try:
        run_stages([Parse(), Count()], {"text": "a b"})
    finally:
        unconfigure_logging()
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["event"] == "counted" and line["n"] == 2 and line["stage"] == "count"
    assert line["correlation_id"].startswith("inline-") and line["attempt"] == 1


def test_stage_timeout_is_enforced() -> None:
    class Slow:
        name = "slow"
        timeout = 0.01

        async def run(self, ctx: StageContext) -> None:
            await asyncio.Event().wait()

    with pytest.raises(TimeoutError, match="exceeded its timeout"):
        run_stages([Slow()], {})


def test_a_bad_stage_list_is_refused() -> None:
    with pytest.raises(ValueError, match="no stages"):
        run_stages([], {})

    class Sync:
        name = "sync"

        def run(self, ctx: StageContext) -> None: ...

    with pytest.raises(TypeError, match="async def"):
        run_stages([Sync()], {})  # type: ignore[list-item]


async def test_inside_a_loop_use_arun_stages() -> None:
    with pytest.raises(RuntimeError, match="arun_stages"):
        run_stages([Parse()], {"text": "x"})
    assert await arun_stages([Parse()], {"text": "x y"}, worker="w") == {"words": ["x", "y"]}
