"""Where a worker process spends its CPU on no-op jobs (issue 17: input for the hot path).

One BaseWorker drains N no-op jobs at concurrency ``--concurrency`` (default 50,
default settings) in this process, on fresh schemas:

1. unprofiled, ``--repeat`` times (median): the process's CPU time (user +
   system, all threads) per job, the figure the hot-path target (<= 40 us per
   no-op job) is about, and its ratio to that target;
2. profiled: py-spy (sampling, ``--rate`` per second, attached to this process;
   the default) or cProfile (``--profiler cprofile``, deterministic, inflates
   Python-heavy calls).

The profile is reported as shares of the sampled CPU and as microseconds per job
(share x the unprofiled CPU per job): the leaf functions (self time), and the
inclusive time of the calls that matter per job (worker_core's own functions,
psycopg, asyncio/uvloop, structlog, json).

    python bench/profile_noop.py [--jobs 50000] [--concurrency 50] [--prefetch]
    python bench/profile_noop.py --profiler cprofile

py-spy comes from bench/compare's venv (``requirements.txt``) or PATH; it needs
ptrace on this process (root, or kernel.yama.ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import _servers
from _common import drop_schema, new_schema, run
from throughput import NoopWorker

from worker_core import Queue, WorkerConfig

HERE = Path(__file__).resolve().parent
TARGET_US = 40.0  # issue 17: client CPU per no-op job at concurrency 50


def config(dsn: str, schema: str, args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig.model_validate(
        {
            "database": {"dsn": dsn, "schema": schema},
            "queue": {
                "name": "bench",
                "concurrency": args.concurrency,
                "prefetch": args.concurrency if args.prefetch else 0,
            },
        }
    )


def find_py_spy() -> str | None:
    local = HERE / "compare" / ".venv" / "bin" / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class PySpy:
    """py-spy record attached to this process, raw (collapsed) stacks to a file."""

    def __init__(self, exe: str, rate: int, native: bool = False) -> None:
        self.exe = exe
        self.rate = rate
        self.native = native
        self.out = Path(tempfile.mkstemp(prefix="wc-pyspy-", suffix=".txt")[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self.stacks: dict[str, int] = {}

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.exe,
                "record",
                "--pid",
                str(os.getpid()),
                "--rate",
                str(self.rate),
                "--format",
                "raw",
                "--output",
                str(self.out),
                # --native reads C stacks, which needs the process paused per sample.
                *(["--native"] if self.native else ["--nonblocking"]),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)  # attached before the drain starts
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"py-spy could not attach: {err.strip()}")

    def stop(self) -> dict[str, int]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        self.proc.wait(timeout=60)
        stacks: dict[str, int] = {}
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                stacks[stack] = stacks.get(stack, 0) + int(count)
        self.out.unlink(missing_ok=True)
        self.stacks = stacks
        return stacks


def frame_name(frame: str) -> str:
    """``function (path/file.py:line)`` -> ``function (file.py)``; paths shortened to
    the package so the same function on other lines counts once."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/worker_core/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({Path(path).name if '/' not in path else path})"


GROUPS = (
    ("worker_core", "worker_core/"),
    ("psycopg (Python)", "psycopg/"),
    ("psycopg_binary (C)", "psycopg_binary/"),
    ("psycopg_pool", "psycopg_pool/"),
    ("asyncio", "asyncio/"),
    ("uvloop", "uvloop/"),
    ("structlog", "structlog/"),
    ("pydantic", "pydantic"),
    ("json / orjson", "json/"),
)


def report_py_spy(stacks: dict[str, int], us_per_job: float, top: int) -> None:
    total = sum(stacks.values()) or 1
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    callers: collections.Counter[tuple[str, str]] = collections.Counter()
    for stack, count in stacks.items():
        frames = stack.split(";")[1:]  # the first element is the thread
        if not frames:
            continue
        leaf[frame_name(frames[-1])] += count
        # The nearest caller in Python code (C frames of --native skipped).
        python_callers = [f for f in frames[:-1] if ".py:" in f]
        if python_callers:
            callers[frame_name(frames[-1]), frame_name(python_callers[-1])] += count
        for name in {frame_name(f) for f in frames}:
            inclusive[name] += count
        last = frames[-1]
        group = next((g for g, marker in GROUPS if marker in last), "other")
        groups[group] += count
    print(f"\n{total:,} CPU samples; 100 % = {us_per_job:.1f} us of CPU per job (unprofiled)")
    print("\nself time by where the leaf frame is (share, us/job):")
    for name, count in groups.most_common():
        print(f"  {count / total:>6.1%} {count / total * us_per_job:>7.1f}  {name}")
    print(f"\nself time, top {top} functions (and their most frequent Python caller):")
    for name, count in leaf.most_common(top):
        mine = [(c, n) for (f, c), n in callers.items() if f == name]
        by = f"  <- {max(mine, key=lambda x: x[1])[0]}" if mine else ""
        print(f"  {count / total:>6.1%} {count / total * us_per_job:>7.1f}  {name}{by}")
    print(f"\ninclusive time, top {top} worker_core functions (a caller includes its callees):")
    ours = [(n, c) for n, c in inclusive.most_common() if is_ours(n)]
    for name, count in ours[:top]:
        print(f"  {count / total:>6.1%} {count / total * us_per_job:>7.1f}  {name}")


def is_ours(name: str) -> bool:
    return "(worker_core/" in name or "/worker_core/" in name


def report_cprofile(profile: cProfile.Profile, us_per_job: float, top: int) -> None:
    stats = pstats.Stats(profile)
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in entries.values()) or 1.0
    print(f"\ncProfile: 100 % = {us_per_job:.1f} us of CPU per job (unprofiled)")
    print(f"\nself time (tottime), top {top}:")
    rows = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for (file, line, func), (_cc, calls, tottime, _cum, _callers) in rows:
        share = tottime / total
        print(
            f"  {share:>6.1%} {share * us_per_job:>7.1f}  {calls:>9,} calls  "
            f"{func} ({Path(file).name}:{line})"
        )
    print(f"\ncumulative time of worker_core functions, top {top}:")
    ours = [
        (k, v)
        for k, v in entries.items()
        if "worker_core" in str(k[0]) and not str(k[0]).endswith("__init__.py")
    ]
    for (file, line, func), (_cc, calls, _tot, cumtime, _callers) in sorted(
        ours, key=lambda kv: kv[1][3], reverse=True
    )[:top]:
        share = cumtime / total
        print(
            f"  {share:>6.1%} {share * us_per_job:>7.1f}  {calls:>9,} calls  "
            f"{func} ({Path(file).name}:{line})"
        )


async def drain_once(dsn: str, args: argparse.Namespace, profiler: Any) -> tuple[float, float]:
    schema = new_schema("prof")
    cfg = config(dsn, schema, args)
    try:
        async with Queue(cfg) as queue:
            await queue.migrate()
            await queue.enqueue_many([{"i": i} for i in range(args.jobs)])
        worker = NoopWorker(cfg)
        if isinstance(profiler, cProfile.Profile):
            profiler.enable()
        elif isinstance(profiler, PySpy):
            profiler.start()
        cpu = time.process_time()
        started = time.perf_counter()
        await worker.run(until_empty=True, install_signal_handlers=False)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        if isinstance(profiler, cProfile.Profile):
            profiler.disable()
        elif isinstance(profiler, PySpy):
            profiler.stop()
        if worker.metrics.processed != args.jobs:
            raise RuntimeError(f"processed {worker.metrics.processed} of {args.jobs}")
        return args.jobs / elapsed, cpu * 1e6 / args.jobs
    finally:
        drop_schema(dsn, schema)


async def main(args: argparse.Namespace) -> None:
    with _servers.from_args(args) as server:
        print(f"server: {server.description}")
        print(
            f"{args.jobs:,} no-op jobs, concurrency {args.concurrency}, prefetch "
            f"{'= concurrency' if args.prefetch else '0 (default)'}; load average "
            f"{os.getloadavg()[0]:.2f}"
        )
        runs = [await drain_once(server.dsn, args, None) for _ in range(args.repeat)]
        rate = statistics.median(r for r, _ in runs)
        us = statistics.median(u for _, u in runs)
        print(
            f"unprofiled, median of {len(runs)}: {rate:,.0f} jobs/s, {us:.1f} us CPU per job "
            f"(this process; range {min(u for _, u in runs):.1f}-{max(u for _, u in runs):.1f}); "
            f"{us / TARGET_US:.2f}x the {TARGET_US:g} us target"
        )
        if args.profiler == "cprofile":
            profile = cProfile.Profile()
            rate_p, us_p = await drain_once(server.dsn, args, profile)
            print(
                f"under cProfile: {rate_p:,.0f} jobs/s ({rate_p / rate:.2f}x unprofiled), "
                f"{us_p:.1f} us CPU per job"
            )
            report_cprofile(profile, us, args.top)
            return
        exe = find_py_spy()
        if exe is None:
            raise SystemExit(
                "py-spy not found: run bench/compare/run.py once, or --profiler cprofile"
            )
        spy = PySpy(exe, args.rate, args.native)
        rate_p, us_p = await drain_once(server.dsn, args, spy)
        stacks = spy.stacks
        print(
            f"under py-spy ({args.rate}/s): {rate_p:,.0f} jobs/s ({rate_p / rate:.2f}x "
            f"unprofiled), {us_p:.1f} us CPU per job"
        )
        report_py_spy(stacks, us, args.top)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--prefetch", action="store_true")
    parser.add_argument("--profiler", choices=["py-spy", "cprofile"], default="py-spy")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=3, help="unprofiled drains (median)")
    parser.add_argument(
        "--native", action="store_true", help="py-spy --native: C frames too (libpq, uvloop)"
    )
    _servers.add_arguments(parser)
    run(main(parser.parse_args()))
