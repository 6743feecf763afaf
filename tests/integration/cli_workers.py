"""Worker classes for the command-line tests (``tests.integration.cli_workers:Echo``)."""

from __future__ import annotations

from typing import Any

from worker_core import BaseWorker, PermanentError, Schedule, StageContext


class Check:
    name = "check"

    async def run(self, ctx: StageContext) -> None:
        if "fail" in ctx.job.payload:
            raise PermanentError(f"refused: {ctx.job.payload['fail']}")
        ctx.state["echo"] = ctx.job.payload


class Echo(BaseWorker):
    def stages(self) -> list[Any]:
        return [Check()]


class Scheduled(Echo):
    def schedules(self) -> list[Schedule]:
        return [
            Schedule("nightly", "0 2 * * *", {}, kind="prune", timezone="Europe/Paris"),
            Schedule("hourly", "0 * * * *", {"bucket": "b"}, queue="scans"),
        ]


class BadlyScheduled(Echo):
    def schedules(self) -> list[Schedule]:
        return [Schedule("x", "0 * * * *", {}, timezone="Nowhere/Town")]


NOT_A_WORKER = 42
