"""Producer and worker processes for the tracing test: ``python otel_proc.py MODE OUT``.

MODE ``produce`` enqueues one job (with ``SyncQueue``) inside a request span;
``work`` drains the queue with a worker whose second stage fails on the first
attempt. Each process configures the OpenTelemetry SDK with an in-memory exporter
and writes the finished spans as JSON lines to OUT. Reads WC_DSN and WC_SCHEMA.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from worker_core import (
    BaseWorker,
    Queue,
    StageContext,
    SyncQueue,
    TransientError,
    WorkerConfig,
)


def config() -> WorkerConfig:
    return WorkerConfig(
        environment="test",
        database={"dsn": os.environ["WC_DSN"], "schema": os.environ["WC_SCHEMA"]},
        queue={"name": "uploads", "poll_interval": 0.1, "flush_interval": 0.01},
        retry={"base_delay": 0.001, "max_delay": 0.01},
    )


class Parse:
    name = "parse"

    async def run(self, ctx: StageContext) -> None:
        ctx.state["words"] = len(ctx.job.payload["text"].split())


class Store:
    name = "store"

    async def run(self, ctx: StageContext) -> None:
        if ctx.job.attempt == 1:
            raise TransientError("storage hiccup at postgresql://app:hunter2@db/x")
        ctx.state["stored"] = True


class Worker(BaseWorker):
    def stages(self) -> list[Any]:
        return [Parse(), Store()]


async def drain() -> None:
    """Run until the job succeeded (its retry is due a few ms after the failure)."""
    worker = Worker(config())
    async with Queue(config()) as queue:
        for _ in range(500):
            await worker.run(until_empty=True, install_signal_handlers=False)
            if (await queue.stats())["succeeded"]:
                return
            await asyncio.sleep(0.01)
    raise SystemExit("the job did not succeed")


def as_dict(span: ReadableSpan) -> dict[str, Any]:
    assert span.context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{span.context.trace_id:032x}",
        "span_id": f"{span.context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
        "status": span.status.status_code.name,
    }


def main(mode: str, out: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    if mode == "produce":
        tracer = trace.get_tracer("upload-app")
        with tracer.start_as_current_span("POST /uploads"), SyncQueue(config()) as queue:
            print(queue.enqueue({"text": "a b c"}), flush=True)
    else:
        asyncio.run(drain())
    provider.shutdown()
    with open(out, "w", encoding="utf-8") as f:
        for span in exporter.get_finished_spans():
            f.write(json.dumps(as_dict(span)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
