"""What the operations console costs a worker fleet: drain time with and without it.

A fleet of worker processes drains N no-op jobs (the most database-bound case:
every job is a claim and a completion). In the loaded runs the dashboard runs in
its own process (`worker-core dashboard`, default settings) and 20 browser-like
clients hit it from another: 10 poll pages every second as a browser with live
refresh would (a page, then its stylesheet, script and chart images), 10 hold the
overview's server-sent-events stream. Runs alternate (baseline, loaded, ...) on
fresh schemas; the queue starts paused, so the clock starts at `resume` with the
fleet registered and the clients warm, and stops when every job has succeeded.

    python bench/dashboard_load.py [--jobs 20000] [--workers 2] [--repeat 3]

Target: the loaded median drain time within 5 % of the baseline median.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import database, drop_schema, new_schema, run, server_version

from worker_core import BaseWorker, Queue, StageContext, WorkerConfig

QUEUE = "bench"
PAGES = ("/", "/jobs", "/queues", "/dead", "/workers", "/breakers")
ASSETS = ("/static/console.css", "/static/console.js")
CHARTS = ("/charts/throughput.svg", "/charts/failures.svg")


class Noop:
    name = "noop"

    async def run(self, ctx: StageContext) -> None:
        return None


class NoopWorker(BaseWorker):
    def stages(self) -> list[Any]:
        return [Noop()]


def config_for(dsn: str, schema: str, concurrency: int = 20) -> WorkerConfig:
    return WorkerConfig(
        database={"dsn": dsn, "schema": schema},
        queue={"name": QUEUE, "concurrency": concurrency},
    )


# -- child processes -----------------------------------------------------------------
async def worker_main(dsn: str, schema: str) -> None:
    await NoopWorker(config_for(dsn, schema)).run()


async def clients_main(base: str, pollers: int, streams: int, seconds: float) -> None:
    import aiohttp

    done = 0
    errors = 0

    async def poller(i: int) -> None:
        nonlocal done, errors
        async with aiohttp.ClientSession() as session:
            n = i
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                started = time.monotonic()
                page = PAGES[n % len(PAGES)]
                for path in (page, *ASSETS, *(CHARTS if page == "/" else ())):
                    try:
                        async with session.get(base + path) as response:
                            await response.read()
                            done += 1
                            errors += response.status != 200
                    except aiohttp.ClientError:
                        errors += 1
                n += 1
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

    async def stream() -> None:
        nonlocal done, errors
        end = time.monotonic() + seconds
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < end:
                try:
                    async with session.get(base + "/api/events") as response:
                        async for _ in response.content.iter_any():
                            done += 1
                            if time.monotonic() > end:
                                return
                except aiohttp.ClientError:
                    errors += 1
                    await asyncio.sleep(0.5)

    await asyncio.gather(*(poller(i) for i in range(pollers)), *(stream() for _ in range(streams)))
    print(f"{done} {errors}", flush=True)


# -- the parent ----------------------------------------------------------------------
def spawn(*args: str, env: dict[str, str] | None = None, nice: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).parent,
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def one_run(dsn: str, jobs: int, workers: int, loaded: bool) -> dict[str, float]:
    schema = new_schema("dash")
    config = config_for(dsn, schema)
    procs: list[subprocess.Popen[str]] = []
    clients: subprocess.Popen[str] | None = None
    try:
        async with Queue(config) as queue:
            await queue.migrate()
            await queue.pause(QUEUE)
            await queue.enqueue_many([{"i": i} for i in range(jobs)])
            procs += [spawn(__file__, "worker", dsn, schema) for _ in range(workers)]

            async def registered() -> bool:
                return len([w for w in await queue.workers() if w["alive"]]) == workers

            await wait_until(registered, 60, "workers registered")
            if loaded:
                port = free_port()
                env = {"WORKER_CORE_DATABASE__DSN": dsn, "WORKER_CORE_DATABASE__SCHEMA": schema}
                procs.append(spawn("-m", "worker_core", "dashboard", "--port", str(port), env=env))
                base = f"http://127.0.0.1:{port}"

                async def up() -> bool:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    except OSError:
                        return False
                    return True

                await wait_until(up, 30, "dashboard listening")
                # Browsers run elsewhere; here they share the machine, at the lowest
                # priority so that they cost the fleet as little as they can.
                clients = spawn(__file__, "clients", base, "10", "10", "600", nice=19)
                await asyncio.sleep(3)  # the clients connect and settle
            succeeded = 0
            dashboard_pid = procs[-1].pid if loaded else None
            cpu_before = cpu_seconds(dashboard_pid) if dashboard_pid else 0.0
            clients_before = cpu_seconds(clients.pid) if clients else 0.0
            started = time.perf_counter()
            await queue.resume(QUEUE)

            async def drained() -> bool:
                nonlocal succeeded
                succeeded = (await queue.stats(QUEUE))["succeeded"]
                return succeeded == jobs

            await wait_until(drained, 600, "queue drained")
            elapsed = time.perf_counter() - started
        out = {"seconds": elapsed, "jobs_per_s": jobs / elapsed}
        if dashboard_pid is not None:
            out["dashboard_cpu"] = (cpu_seconds(dashboard_pid) - cpu_before) / elapsed
        if clients is not None:
            out["clients_cpu"] = (cpu_seconds(clients.pid) - clients_before) / elapsed
        if clients is not None:
            clients.send_signal(signal.SIGTERM)
        return out
    finally:
        for proc in [*procs, *([clients] if clients else [])]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*procs, *([clients] if clients else [])]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        drop_schema(dsn, schema)


async def client_rate(dsn: str, seconds: float = 10.0) -> tuple[float, int]:
    """Responses (and stream chunks) per second the 20 clients get from an idle dashboard."""
    schema = new_schema("dash")
    config = config_for(dsn, schema)
    async with Queue(config) as queue:
        await queue.migrate()
        await queue.enqueue_many([{"i": i} for i in range(1000)])
    port = free_port()
    env = {"WORKER_CORE_DATABASE__DSN": dsn, "WORKER_CORE_DATABASE__SCHEMA": schema}
    dashboard = spawn("-m", "worker_core", "dashboard", "--port", str(port), env=env)
    try:
        await asyncio.sleep(2)
        clients = spawn(__file__, "clients", f"http://127.0.0.1:{port}", "10", "10", str(seconds))
        out, _ = clients.communicate(timeout=seconds + 60)
        done, errors = (int(x) for x in out.split())
        return done / seconds, errors
    finally:
        dashboard.send_signal(signal.SIGTERM)
        dashboard.wait(timeout=30)
        drop_schema(dsn, schema)


async def main(jobs: int, workers: int, repeat: int) -> None:
    with database() as dsn:
        print(f"PostgreSQL {server_version(dsn)}; {jobs:,} no-op jobs, {workers} worker processes "
              f"(concurrency 20 each), {repeat} runs each; machine: {os.cpu_count()} cores")  # fmt: skip
        rate, errors = await client_rate(dsn)
        print(f"20 clients against an idle dashboard: {rate:,.0f} responses/s, {errors} errors")
        base: list[float] = []
        loaded: list[float] = []
        for i in range(repeat):
            for is_loaded, into in ((False, base), (True, loaded)):
                result = await one_run(dsn, jobs, workers, is_loaded)
                into.append(result["seconds"])
                label = "with dashboard + 20 clients" if is_loaded else "baseline"
                cpu = result.get("dashboard_cpu")
                note = (
                    ""
                    if cpu is None
                    else (
                        f"; CPU: dashboard {cpu:.1%}, clients {result['clients_cpu']:.1%} of a core"
                    )
                )
                print(f"  run {i + 1} {label:<28} {result['seconds']:6.2f} s "
                      f"({result['jobs_per_s']:,.0f} jobs/s){note}", flush=True)  # fmt: skip
        b, lo = statistics.median(base), statistics.median(loaded)
        added = lo / b - 1
        verdict = "OK" if added < 0.05 else "MISSED"
        print(f"drain time: baseline median {b:.2f} s (range {min(base):.2f}-{max(base):.2f}), "
              f"with the console median {lo:.2f} s (range {min(loaded):.2f}-{max(loaded):.2f})")  # fmt: skip
        print(f"ratio {lo / b:.3f}: the console adds {added:+.1%} (target < 5 %) {verdict}")
        best = min(loaded) / min(base) - 1
        print(f"best runs: {min(base):.2f} s vs {min(loaded):.2f} s, the console adds {best:+.1%}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        asyncio.run(worker_main(sys.argv[2], sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "clients":
        base, pollers, streams, seconds = sys.argv[2:6]
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        asyncio.run(clients_main(base, int(pollers), int(streams), float(seconds)))
    else:
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("--jobs", type=int, default=20_000)
        parser.add_argument("--workers", type=int, default=2)
        parser.add_argument("--repeat", type=int, default=3)
        args = parser.parse_args()
        run(main(args.jobs, args.workers, args.repeat))
