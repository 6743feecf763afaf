"""Which form of ``claim_one`` is faster: the InitPlan or a MATERIALIZED CTE? (issue 11)

``claim_one`` picks and locks its rows in an InitPlan, ``UPDATE ... WHERE j.id =
ANY(ARRAY(SELECT ... FOR NO KEY UPDATE SKIP LOCKED))``, chosen at stop 20 because
it plans a third faster than the CTE form of the general claim. This script
derives the CTE form from this checkout's ``claim_one`` (``WITH picked AS
MATERIALIZED (...) UPDATE ... FROM picked``: the same pick, SET and RETURNING)
and times the two in turn on one connection (prepared after 5 calls, as the
worker's are), each claim taking the ``--batch`` jobs just enqueued, on a table
with ``--finished`` finished rows (vacuumed and analyzed). Printed per form: the
round trip (p50, p90), the server backend's CPU per claim (from ``/proc``, when
the server runs here), and the CTE / InitPlan ratios of this run.

    python bench/claim_forms.py [--claims 1500] [--batch 1] [--finished 20000]
    python bench/claim_forms.py --batch 50 --claims 300
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from _common import cpu_sum, database, drop_schema, finished_jobs, new_schema
from _servers import process_cpu

from worker_core import Queue, WorkerConfig


def cte_form(initplan: bytes) -> bytes:
    """``claim_one`` with its rows picked in a MATERIALIZED CTE instead of the InitPlan."""
    update, sep, rest = initplan.partition(b"\nWHERE j.id = ANY(ARRAY(\n")
    pick, sep2, returning = rest.partition(b"\n))\n")
    if not (update.startswith(b"UPDATE ") and sep and sep2):
        raise SystemExit("claim_one no longer has the expected InitPlan shape")
    return (
        b"WITH picked AS MATERIALIZED (\n" + pick + b"\n)\n" + update
        + b"\nFROM picked\nWHERE j.id = picked.id\n" + returning
    )  # fmt: skip


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def measure(dsn: str, schema: str, args: argparse.Namespace) -> None:
    config = WorkerConfig.model_validate(
        {"database": {"dsn": dsn, "schema": schema}, "queue": {"name": "q"}}
    )
    async with Queue(config) as queue:
        await queue.migrate()
        await finished_jobs(queue, args.finished)
        initplan = queue._sql["claim_one"]
        statements = {"CTE": cte_form(initplan), "InitPlan (claim_one)": initplan}
        times: dict[str, list[float]] = {name: [] for name in statements}
        cpu: dict[str, float | None] = dict.fromkeys(statements, 0.0)
        params = {"queue": "q", "limit": args.batch, "owner": "bench", "lease": 60.0}
        async with queue.connection() as conn:
            row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
            pid = int(row[0]) if row else 0
            for i in range(args.claims):
                order = list(statements) if i % 2 else list(reversed(statements))
                for name in order:
                    await queue.enqueue_many([{"n": i}] * args.batch)
                    before = process_cpu(pid)
                    started = time.perf_counter()
                    cur = await conn.execute(statements[name], params)
                    got = len(await cur.fetchall())
                    times[name].append(time.perf_counter() - started)
                    after = process_cpu(pid)
                    cpu[name] = cpu_sum(cpu[name], before, after)
                    if got != args.batch:
                        raise SystemExit(f"{name} claimed {got} of {args.batch} jobs")
    warm = min(20, args.claims // 10)
    print(
        f"{args.claims:,} claims of {args.batch} job(s) each per form, interleaved on one "
        f"connection; {args.finished:,} finished rows in the table"
    )
    for name, values in times.items():
        values[:] = values[warm:]
        used = cpu[name]
        cpu_text = "n/a" if used is None else f"{used * 1e6 / args.claims:,.0f} us"
        print(
            f"  {name:20s} p50 {p(values, 0.5) * 1e3:.3f} ms  p90 {p(values, 0.9) * 1e3:.3f} ms"
            f"  backend CPU per claim {cpu_text}"
        )
    first, second = (times[name] for name in statements)
    print(
        f"CTE / InitPlan: p50 {statistics.median(first) / statistics.median(second):.2f}, "
        f"p90 {p(first, 0.9) / p(second, 0.9):.2f}"
    )
    a, b = cpu.values()
    if a is not None and b:
        print(f"CTE / InitPlan backend CPU: {a / b:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=1500, help="claims per form (>= 50)")
    parser.add_argument("--batch", type=int, default=1, help="jobs per claim (1-1000)")
    parser.add_argument("--finished", type=int, default=20_000, help="finished rows (>= 0)")
    args = parser.parse_args()
    if args.claims < 50 or not 1 <= args.batch <= 1000 or args.finished < 0:
        parser.error("--claims must be >= 50, --batch 1-1000, --finished >= 0")
    with database() as dsn:
        schema = new_schema("forms")
        try:
            asyncio.run(measure(dsn, schema, args))
        finally:
            drop_schema(dsn, schema)


if __name__ == "__main__":
    main()
