"""Bulk enqueue: ``Queue.enqueue_many`` against one plain INSERT ... SELECT FROM unnest.

Both insert the same 100,000 rows (payloads serialised from Python dicts) into the
same jobs table; each is repeated and the median taken. Target: ratio >= 0.8.

    python bench/enqueue.py [--jobs 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import database, drop_schema, new_schema, run, server_version, summary
from psycopg import AsyncConnection, sql

from worker_core import Queue, WorkerConfig


def payloads(n: int) -> list[dict[str, object]]:
    return [{"document_id": f"doc-{i}", "key": f"incoming/{i}.txt", "n": i} for i in range(n)]


async def run_library(dsn: str, rows: list[dict[str, object]]) -> float:
    schema = new_schema()
    config = WorkerConfig(database={"dsn": dsn, "schema": schema}, queue={"name": "bench"})
    try:
        async with Queue(config) as queue:
            await queue.migrate()
            started = time.perf_counter()
            ids = await queue.enqueue_many(rows)
            elapsed = time.perf_counter() - started
            assert len(ids) == len(rows)
        return len(rows) / elapsed
    finally:
        drop_schema(dsn, schema)


async def run_raw(dsn: str, rows: list[dict[str, object]]) -> float:
    schema = new_schema()
    config = WorkerConfig(database={"dsn": dsn, "schema": schema}, queue={"name": "bench"})
    try:
        async with Queue(config) as queue:
            await queue.migrate()
        async with await AsyncConnection.connect(dsn, autocommit=True) as conn:
            query = sql.SQL(
                "INSERT INTO {}.jobs (queue, payload) SELECT 'bench', p::jsonb FROM unnest(%s::text[]) AS p"
            ).format(sql.Identifier(schema))
            started = time.perf_counter()
            texts = [json.dumps(row) for row in rows]
            cur = await conn.execute(query, (texts,))
            elapsed = time.perf_counter() - started
            assert cur.rowcount == len(rows)
        return len(rows) / elapsed
    finally:
        drop_schema(dsn, schema)


async def main(jobs: int, repeat: int) -> None:
    rows = payloads(jobs)
    with database() as dsn:
        print(f"PostgreSQL {server_version(dsn)}; {jobs:,} jobs, {repeat} runs each")
        lib, raw = [], []
        for _ in range(repeat):  # interleaved so drift hits both alike
            raw.append(await run_raw(dsn, rows))
            lib.append(await run_library(dsn, rows))
    ratio = statistics.median(lib) / statistics.median(raw)
    print(f"raw INSERT ... SELECT FROM unnest: {summary(raw)} jobs/s")
    print(f"Queue.enqueue_many:               {summary(lib)} jobs/s")
    print(
        f"ratio enqueue_many / raw: {ratio:.2f} (target >= 0.80) {'OK' if ratio >= 0.8 else 'MISSED'}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    run(main(args.jobs, args.repeat))
