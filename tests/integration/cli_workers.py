"""Worker classes for the command-line tests (``tests.integration.cli_workers:Echo``)."""

from __future__ import annotations

from typing import Any

from worker_core import BaseWorker, PermanentError, StageContext


class Check:
    name = "check"

    async def run(self, ctx: StageContext) -> None:
        if "fail" in ctx.job.payload:
            raise PermanentError(f"refused: {ctx.job.payload['fail']}")
        ctx.state["echo"] = ctx.job.payload


class Echo(BaseWorker):
    def stages(self) -> list[Any]:
        return [Check()]


NOT_A_WORKER = 42
