"""Logging overhead: microseconds per line, lines per job and microseconds per job.

1. Per line: a job's line (``StructuredLogger.info`` with the worker's bound
   context, the job context and one field) and a stdlib record in the same job
   context, rendered by ``configure_logging`` as JSON to /dev/null, against
   logging off (no configuration: a level check only).
2. Per job: the same worker drains N jobs (two stages, one application line per
   job) with logging off, then with ``configure_logging`` (JSON to /dev/null) at
   INFO and at DEBUG. Lines are counted; the overhead per job is the difference
   in CPU time of this process (PostgreSQL runs in its own processes, so the
   figure is not drowned by database waits), with the wall-clock difference
   printed for reference.

    python bench/log_overhead.py [--jobs 5000] [--repeat 3] [--lines 50000]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import time
import uuid
from typing import Any

from _common import database, drop_schema, new_schema, run, server_version

from worker_core import BaseWorker, Queue, StageContext, WorkerConfig
from worker_core.logs import StructuredLogger, configure_logging, job_context, unconfigure_logging


class CountingNull(io.TextIOBase):
    """/dev/null that counts what the handler writes (one write per line)."""

    def __init__(self) -> None:
        self.lines = 0
        self._null = open(os.devnull, "w")  # noqa: SIM115 - closed in close()

    def write(self, text: str) -> int:
        self.lines += 1
        return self._null.write(text)

    def flush(self) -> None:
        if not self._null.closed:
            self._null.flush()

    def close(self) -> None:
        super().close()
        self._null.close()


def per_line(lines: int) -> dict[str, float]:
    """Microseconds per line, by kind of line and configuration."""
    root = logging.getLogger()
    log = StructuredLogger("worker_core.worker", worker_id="host:4242:a1b2c3", queue="docs")
    stdlib = logging.getLogger("thirdparty.client")
    job = {"queue": "docs", "attempt": 1, "worker_id": "host:4242:a1b2c3", "stage": "embed"}
    # A real worker sees a new correlation id every job: text never seen before
    # misses the redaction cache, so time both a steady context and a new job
    # every two lines (the INFO lines of a job in bench 2).
    ids = [str(uuid.uuid4()) for _ in range(lines // 2)]

    def timed(emit: Any, fresh: bool) -> float:
        with job_context(correlation_id=ids[0], job_id=0, **job):
            for _ in range(1000):  # warm caches
                emit()
        started = time.perf_counter()
        for i in range(lines // 2):
            with job_context(correlation_id=ids[i if fresh else 0], job_id=i, **job):
                emit()
                emit()
        return (time.perf_counter() - started) / (lines // 2 * 2) * 1e6

    def ours() -> None:
        log.info("job succeeded", seconds=0.012345)

    def theirs() -> None:
        stdlib.info("GET %s -> %d", "/v1/embeddings", 200)

    kinds = {"StructuredLogger": ours, "stdlib": theirs}
    out = {f"off: {name}": timed(emit, True) for name, emit in kinds.items()}
    sink = CountingNull()
    configure_logging("INFO", stream=sink)
    try:
        for name, emit in kinds.items():
            out[f"json: {name}, same job"] = timed(emit, False)
            out[f"json: {name}, new job"] = timed(emit, True)
    finally:
        unconfigure_logging()
        root.setLevel(logging.WARNING)
        sink.close()
    return out


class Parse:
    name = "parse"

    async def run(self, ctx: StageContext) -> None:
        ctx.state["words"] = len(ctx.job.payload["text"].split())
        ctx.logger.info("parsed", words=ctx.state["words"])


class Store:
    name = "store"

    async def run(self, ctx: StageContext) -> None:
        ctx.state["stored"] = True


class BenchWorker(BaseWorker):
    def stages(self) -> list[Any]:
        return [Parse(), Store()]


async def drain(dsn: str, jobs: int, level: str | None) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, lines) of one worker draining ``jobs`` jobs."""
    schema = new_schema("logbench")
    config = WorkerConfig(
        database={"dsn": dsn, "schema": schema},
        queue={"name": "bench", "concurrency": 20},
    )
    root = logging.getLogger()
    sink = CountingNull()
    try:
        async with Queue(config) as queue:
            await queue.migrate()
            await queue.enqueue_many(
                [{"text": f"document {i} has a few words"} for i in range(jobs)]
            )
        if level is not None:
            configure_logging(level, stream=sink, secrets=config.secrets())
        worker = BenchWorker(config)
        cpu, wall = time.process_time(), time.perf_counter()
        await worker.run(until_empty=True, install_signal_handlers=False)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        assert worker.metrics.processed == jobs, worker.metrics.summary()
        return cpu, wall, sink.lines
    finally:
        unconfigure_logging()
        root.setLevel(logging.WARNING)
        sink.close()
        drop_schema(dsn, schema)


async def per_job(dsn: str, jobs: int, repeat: int) -> None:
    modes: dict[str, str | None] = {"off": None, "json INFO": "INFO", "json DEBUG": "DEBUG"}
    runs: dict[str, list[tuple[float, float, int]]] = {mode: [] for mode in modes}
    await drain(dsn, min(jobs, 500), None)  # warm-up: imports, prepared statements
    for _ in range(repeat):
        for mode, level in modes.items():  # interleaved, so drift hits every mode alike
            runs[mode].append(await drain(dsn, jobs, level))
    cpu_off = statistics.median(r[0] for r in runs["off"]) / jobs * 1e6
    wall_off = statistics.median(r[1] for r in runs["off"]) / jobs * 1e6
    print(f"\nper job ({jobs:,} jobs, 2 stages, 1 application line; medians of {repeat} runs)")
    print(f"  logging off:  {cpu_off:7.1f} us CPU/job, {wall_off:7.1f} us wall/job")
    for mode in ("json INFO", "json DEBUG"):
        cpu = statistics.median(r[0] for r in runs[mode]) / jobs * 1e6
        wall = statistics.median(r[1] for r in runs[mode]) / jobs * 1e6
        lines = statistics.median(r[2] for r in runs[mode]) / jobs
        extra = cpu - cpu_off
        print(
            f"  {mode:11s}:  {cpu:7.1f} us CPU/job, {wall:7.1f} us wall/job; "
            f"{lines:.2f} lines/job; overhead {extra:+.1f} us CPU/job "
            f"({extra / cpu_off:+.0%}), {extra / lines if lines else 0:.1f} us/line; "
            f"wall {wall - wall_off:+.1f} us/job"
        )


async def main(jobs: int, repeat: int, lines: int) -> None:
    print(f"per line ({lines:,} lines in a job's context, 2 per job_context; JSON to /dev/null)")
    figures = per_line(lines)
    for name, micros in figures.items():
        kind = name.split(": ")[1].split(",")[0]
        extra = micros - figures[f"off: {kind}"]
        delta = f" ({extra:+.2f} over off: the cost of the line)" if name.startswith("json") else ""
        print(f"  {name:34s} {micros:6.2f} us/line{delta}")
    print("  (off includes binding a job context every two lines, as the worker does)")
    with database() as dsn:
        print(f"\nPostgreSQL {server_version(dsn)}")
        await per_job(dsn, jobs, repeat)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lines", type=int, default=50_000)
    args = parser.parse_args()
    run(main(args.jobs, args.repeat, args.lines))
