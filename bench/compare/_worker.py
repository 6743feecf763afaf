"""A benchmark worker process (started by run.py, in the benchmark venv).

Protocol on stdin/stdout, so that start-up (interpreter, imports, connections) is
never timed: the process prepares its worker, prints ``READY``, waits for a ``GO``
line, runs, and prints one JSON line ``{"start", "end", "count", "samples"}`` with
``time.monotonic()`` values (CLOCK_MONOTONIC: one clock for every process of the
machine). Everything else (library logs at WARNING) goes to stderr.

    python _worker.py --lib pgqueuer-asyncpg --dsn DSN --concurrency 50 --mode drain
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

from _libs import LIBS, Body


async def main(args: argparse.Namespace) -> dict[str, object]:
    lib = LIBS[args.lib]
    body = Body(sleep=args.sleep_ms / 1000, record=args.record, expect=args.expect)
    run = await lib.worker(args.dsn, args.concurrency, args.processes, body)
    loop = asyncio.get_running_loop()
    try:
        print("READY", flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "GO":
            raise SystemExit(f"expected GO, got {line!r}")
        start = time.monotonic()
        if args.mode == "drain":
            await run.drain()
        else:
            stop = asyncio.Event()

            async def stop_when_done() -> None:
                try:
                    await asyncio.wait_for(body.reached.wait(), args.timeout)
                finally:
                    stop.set()

            watcher = asyncio.create_task(stop_when_done())
            await run.serve(stop)
            await watcher
        end = time.monotonic()
    finally:
        await run.close()
    return {"start": start, "end": end, "count": body.count, "samples": body.samples}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", required=True, choices=sorted(LIBS))
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--mode", choices=["drain", "serve"], default="drain")
    parser.add_argument("--sleep-ms", type=float, default=0.0)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(main(args))
    print(json.dumps(result), flush=True)
