"""Paced latency and what the server spends on each statement, against a base (issue 11).

The paced scenario of ``bench/compare`` (a worker at concurrency 50, 10 ms jobs
enqueued one by one at ``--rate`` jobs/s; latency from just before the enqueue to
the end of the stage, the first ``--warmup`` jobs left out; here the producer runs
in the worker's process, on a pool of its own), run in a
fresh database for each variant, with ``pg_stat_statements`` read for that
database afterwards: for the claim, outcome and enqueue statements, their calls,
mean execution time and how many times they were planned (a prepared statement
is planned again after each invalidation of its table's cache, for example by
VACUUM or ANALYZE).

Variants, interleaved over ``--repeat`` rounds (the order alternating):

- ``this``: this checkout with its default settings;
- ``this, analyze off``: the same with ``maintenance.analyze_growth_factor = None``
  (``--no-analyze-variant`` leaves it out);
- other checkouts (``--base DIR ...`` or ``$WORKER_CORE_BENCH_BASE``, for example
  a ``git worktree`` of the first version), each with its defaults, named by
  its directory.

Printed: one line per run, the medians per variant, and each variant's p50 and
p99 against ``this`` (medians of the per-round ratios).

    python bench/paced_statements.py --base /tmp/base [--repeat 4] [--jobs 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from _servers import add_arguments, from_args
from psycopg import sql
from psycopg.conninfo import make_conninfo

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent

#: What runs in the child process, with PYTHONPATH naming the checkout measured.
CHILD = r"""
import asyncio, json, statistics, sys, time
from worker_core import BaseWorker, Queue, WorkerConfig

dsn, jobs, rate, warmup, settings = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
latencies = []

class Sleep:
    name = "sleep"
    async def run(self, ctx):
        await asyncio.sleep(0.01)
        latencies.append(time.monotonic() - ctx.job.payload["t"])

class Worker(BaseWorker):
    def stages(self):
        return [Sleep()]

async def main():
    config = WorkerConfig.model_validate({
        "database": {"dsn": dsn, "schema": "paced"},
        "queue": {"name": "q", "concurrency": 50},
        "logging": {"level": "WARNING"},
        **settings,
    })
    async with Queue(config) as queue:
        await queue.migrate()
        worker = Worker(config)
        running = asyncio.create_task(worker.run(install_signal_handlers=False))
        await asyncio.sleep(1.5)  # up, listening and idle
        start = time.monotonic()
        for i in range(jobs):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await queue.enqueue({"i": i, "t": time.monotonic()})
        deadline = time.monotonic() + 60
        while len(latencies) < jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await worker.stop()
        await asyncio.wait_for(running, 30)
    if len(latencies) != jobs:
        raise SystemExit(f"{len(latencies)} of {jobs} jobs ran")
    ms = sorted(x * 1000 for x in latencies[warmup:])
    print(json.dumps({"p50": statistics.median(ms), "p99": statistics.quantiles(ms, n=100)[98]}))

try:
    import uvloop
    uvloop.install()
except ImportError:
    pass
asyncio.run(main())
"""

#: The statements reported, told apart by their normalized text (constants are $n).
STATEMENTS = ("claim", "outcome", "enqueue")


def statement_kind(query: str) -> str | None:
    if re.search(r"INSERT INTO \S+\.jobs\b", query):
        return "enqueue"
    if not re.search(r"UPDATE \S+\.jobs\b", query):
        return None
    if "attempt = j.attempt + $" in query and "SKIP LOCKED" in query:  # a new attempt
        return "claim"
    if "jsonb_to_recordset" in query or "WITH u AS" in query:  # this version's, the first's
        return "outcome"
    return None


def run_variant(admin: str, db: str, checkout: Path, args: argparse.Namespace,
                settings: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        oid = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (db,)).fetchone()
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, "-c", CHILD, make_conninfo(admin, dbname=db), str(args.jobs),
               str(args.rate), str(args.warmup), json.dumps(settings)]  # fmt: skip
    done = subprocess.run(command, env=env, cwd="/", capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{checkout}: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    with psycopg.connect(admin, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT query, calls, plans, mean_exec_time FROM pg_stat_statements "
            "WHERE dbid = %s AND calls > 0",
            (oid[0] if oid else None,),
        ).fetchall()
        conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(db)))
    found: dict[str, list[float]] = {}
    for query, calls, plans, mean_ms in rows:
        kind = statement_kind(query)
        if kind is None:
            continue
        c, p, total = found.get(kind, [0, 0, 0.0])
        found[kind] = [c + calls, p + plans, total + calls * mean_ms]
    result["statements"] = {
        kind: {"calls": int(c), "plans": int(p), "exec_us": 1000 * total / c if c else 0.0}
        for kind, (c, p, total) in found.items()
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--base", nargs="*", default=[os.environ.get("WORKER_CORE_BENCH_BASE")],
                        help="other checkouts, each a variant named by its directory "
                        "(default: $WORKER_CORE_BENCH_BASE)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=4, help="rounds (>= 1)")
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per run (>= 100)")
    parser.add_argument("--rate", type=float, default=200.0, help="jobs per second (1-1000)")
    parser.add_argument("--warmup", type=int, default=200, help="first jobs left out")
    parser.add_argument("--no-analyze-variant", action="store_true",
                        help="leave out this checkout with analyze_growth_factor = None")  # fmt: skip
    args = parser.parse_args()
    if args.repeat < 1 or args.jobs < 100 or not 1 <= args.rate <= 1000:
        parser.error("--repeat must be >= 1, --jobs >= 100, --rate 1-1000")
    if not 0 <= args.warmup < args.jobs - 10:
        parser.error("--warmup must leave at least 10 jobs")
    variants: list[tuple[str, Path, dict[str, Any]]] = [("this", CHECKOUT, {})]
    if not args.no_analyze_variant:
        off = {"maintenance": {"analyze_growth_factor": None}}
        variants.append(("this, analyze off", CHECKOUT, off))
    for base in filter(None, args.base):
        variants.append((Path(base).resolve().name, Path(base).resolve(), {}))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
    with from_args(args, pg_stat_statements=True) as server:
        if not server.pg_stat_statements:
            raise SystemExit("this script needs pg_stat_statements in the server")
        print(f"server: {server.description}; {args.jobs:,} jobs of 10 ms at {args.rate:g}/s, "
              f"concurrency 50, first {args.warmup} left out")  # fmt: skip
        for r in range(args.repeat):
            order = variants if r % 2 == 0 else variants[::-1]
            for i, (name, checkout, settings) in enumerate(order):
                result = run_variant(server.dsn, f"paced_{r}_{i}", checkout, args, settings)
                results[name].append(result)
                shown = "; ".join(
                    f"{kind} {s['exec_us']:.0f} us x{s['calls']} ({s['plans']} plans)"
                    for kind, s in sorted(result["statements"].items())
                )
                print(f"  round {r + 1} {name:18s} p50 {result['p50']:6.2f} ms  "
                      f"p99 {result['p99']:6.2f} ms  | {shown}", flush=True)  # fmt: skip
    print("medians of the rounds:")
    for name, runs in results.items():
        line = f"  {name:18s} p50 {statistics.median(x['p50'] for x in runs):6.2f} ms  "
        line += f"p99 {statistics.median(x['p99'] for x in runs):6.2f} ms"
        for kind in STATEMENTS:
            values = [x["statements"][kind]["exec_us"] for x in runs if kind in x["statements"]]
            if values:
                line += f"  {kind} {statistics.median(values):.0f} us"
        print(line)
    this = results["this"]
    for name, runs in results.items():
        if name == "this":
            continue
        for q in ("p50", "p99"):
            ratio = statistics.median(a[q] / b[q] for a, b in zip(runs, this, strict=True))
            print(f"{name} / this, {q}: {ratio:.3f}")


if __name__ == "__main__":
    main()
