"""Would claiming the job a NOTIFY announces, by its id, be faster? (issue 17)

On an idle queue with one ready job and a backlog of finished rows (an aged table),
the worker's general claim (``claim_one``: the best ready job of the queue) and the
same statement narrowed to one id (``q.id = %(id)s``, still ``SKIP LOCKED``, the
same fresh lease token) are timed in turn on one connection, each claim taking
the job just enqueued. Printed: the round trip (p50, p99) and the server backend's
CPU per claim (from ``/proc``, when the server runs here), and the by-id / general
ratios of this run.

    python bench/claim_by_id.py [--claims 3000] [--finished 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from _common import cpu_sum, database, drop_schema, finished_jobs, new_schema
from _servers import process_cpu

from worker_core import Queue, WorkerConfig

_PICK = b"WHERE q.queue = %(queue)s AND q.status = 'queued' AND q.run_at <= now()"


async def measure(dsn: str, schema: str, claims: int, finished: int) -> None:
    config = WorkerConfig.model_validate(
        {"database": {"dsn": dsn, "schema": schema}, "queue": {"name": "q"}}
    )
    async with Queue(config) as queue:
        await queue.migrate()
        await finished_jobs(queue, finished)
        general = queue._sql["claim_one"]
        by_id = general.replace(_PICK, b"WHERE q.id = %(id)s AND " + _PICK[len(b"WHERE ") :])
        if by_id == general:
            raise SystemExit("claim_one no longer has the expected WHERE clause")
        statements = {"general": general, "by id": by_id}
        times: dict[str, list[float]] = {name: [] for name in statements}
        cpu: dict[str, float | None] = dict.fromkeys(statements, 0.0)
        async with queue.connection() as conn:
            row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
            pid = int(row[0]) if row else 0
            for i in range(claims):
                order = list(statements) if i % 2 else list(reversed(statements))
                for name in order:
                    [job_id] = await queue.enqueue_many([{"n": i}])
                    params = {"queue": "q", "limit": 50, "owner": "bench", "lease": 60.0}
                    before = process_cpu(pid)
                    started = time.perf_counter()
                    cur = await conn.execute(statements[name], {**params, "id": job_id})
                    rows = await cur.fetchall()
                    times[name].append(time.perf_counter() - started)
                    after = process_cpu(pid)
                    cpu[name] = cpu_sum(cpu[name], before, after)
                    if [r[0] for r in rows] != [job_id]:
                        raise SystemExit(f"{name}: claimed {rows!r}, expected job {job_id}")
    figures: dict[str, tuple[float, float, float | None]] = {}
    for name, xs in times.items():
        xs.sort()
        spent = cpu[name]
        figures[name] = (
            statistics.median(xs) * 1e3,
            xs[int(len(xs) * 0.99)] * 1e3,
            None if spent is None else spent / len(xs) * 1e6,
        )
        p50, p99, us = figures[name]
        backend = "n/a" if us is None else f"{us:.0f} us"
        print(
            f"{name:8} round trip p50 {p50:.3f} ms, p99 {p99:.3f} ms; backend CPU {backend} a claim"
        )
    (g50, g99, gcpu), (b50, b99, bcpu) = figures["general"], figures["by id"]
    ratio_cpu = f"{bcpu / gcpu:.2f}" if gcpu and bcpu is not None else "n/a"
    print(f"by id / general: p50 {b50 / g50:.2f}, p99 {b99 / g99:.2f}, backend CPU {ratio_cpu}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, default=3000, help="claims of each kind (>= 1)")
    parser.add_argument("--finished", type=int, default=100_000, help="finished rows first")
    args = parser.parse_args()
    if args.claims < 1 or args.finished < 0:
        parser.error("--claims must be at least 1 and --finished at least 0")
    with database() as dsn:
        schema = new_schema("byid")
        try:
            asyncio.run(measure(dsn, schema, args.claims, args.finished))
        finally:
            drop_schema(dsn, schema)


if __name__ == "__main__":
    main()
