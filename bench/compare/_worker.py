"""A benchmark process (started by run.py, in the library's venv).

Modes ``drain`` and ``serve`` run a worker. Protocol on stdin/stdout, so that
start-up (interpreter, imports, connections) is never timed: the process prepares
its worker, prints ``READY``, waits for a ``GO`` line, runs, and prints one JSON
line ``{"start", "end", "count", "samples", "cpu"}`` with ``time.monotonic()``
values (CLOCK_MONOTONIC: one clock for every process of the machine) and ``cpu``
the process's CPU seconds (user + system, all threads) from GO to end.
Everything else (library logs at WARNING) goes to stderr.

Modes ``install``, ``verify`` and ``produce`` serve a library that cannot run in
run.py's own interpreter (Oban needs Python >= 3.12): ``install`` and ``verify``
print ``{}`` when done; ``produce`` opens the library's producer, prints
``READY`` and then answers one JSON line per command line: ``{"op": "many",
"n": N}`` enqueues N payloads ``{"i": i}`` with the bulk API and answers
``{"added", "elapsed"}`` (the call alone timed, as in run.py); ``{"op": "one",
"i": i}`` enqueues ``{"i": i, "t": now}`` with the single-job API; an empty line
ends it.

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


async def produce(args: argparse.Namespace) -> None:
    lib = LIBS[args.lib]
    loop = asyncio.get_running_loop()
    async with lib.producer(args.dsn) as producer:
        print("READY", flush=True)
        while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            command = json.loads(line)
            if command["op"] == "many":
                rows = [{"i": i} for i in range(int(command["n"]))]
                started = time.perf_counter()
                added = await producer.enqueue_many(rows)
                reply: dict[str, object] = {
                    "added": added,
                    "elapsed": time.perf_counter() - started,
                }
            else:
                await producer.enqueue_one({"i": int(command["i"]), "t": time.monotonic()})
                reply = {}
            print(json.dumps(reply), flush=True)


async def main(args: argparse.Namespace) -> dict[str, object]:
    lib = LIBS[args.lib]
    if args.mode == "install":
        await lib.install(args.dsn)
        return {}
    if args.mode == "verify":
        await lib.verify(args.dsn, args.expect)
        return {}
    if args.mode == "produce":
        await produce(args)
        return {}
    body = Body(sleep=args.sleep_ms / 1000, record=args.record, expect=args.expect)
    run = await lib.worker(args.dsn, args.concurrency, args.processes, body)
    loop = asyncio.get_running_loop()
    try:
        print("READY", flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "GO":
            raise SystemExit(f"expected GO, got {line!r}")
        start = time.monotonic()
        cpu = time.process_time()
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
        cpu = time.process_time() - cpu
    finally:
        await run.close()
    return {"start": start, "end": end, "count": body.count, "samples": body.samples, "cpu": cpu}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", required=True, choices=sorted(LIBS))
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument(
        "--mode", choices=["drain", "serve", "install", "verify", "produce"], default="drain"
    )
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
    if args.mode != "produce":
        print(json.dumps(result), flush=True)
