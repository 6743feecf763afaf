"""What one job and one chunk cost the database: WAL bytes and dead row versions.

These decide when one PostgreSQL stops being enough (docs/scaling.md): WAL is what
every standby must receive and replay (and what synchronous replication waits
for), dead rows are what vacuum must keep up with.

1. Enqueue N no-op jobs (enqueue_many), drain them with one worker, prune them:
   WAL bytes per job for each phase, dead rows left per job.
2. Write N chunks of `--dimensions` embeddings with ChunkWriter (one transaction
   per 10-chunk document): WAL bytes per chunk.

    python bench/wal_per_job.py [--jobs 20000] [--dimensions 384]
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from _common import database, drop_schema, new_schema, run, server_version
from psycopg import AsyncConnection, sql

from worker_core import BaseWorker, Chunk, ChunkWriter, Queue, StageContext, WorkerConfig


class Noop:
    name = "noop"

    async def run(self, ctx: StageContext) -> None:
        return None


class NoopWorker(BaseWorker):
    def stages(self) -> list[Any]:
        return [Noop()]


async def lsn(conn: AsyncConnection[Any]) -> int:
    cur = await conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def dead_rows(conn: AsyncConnection[Any], schema: str) -> int:
    await conn.execute("SELECT pg_stat_force_next_flush()")
    cur = await conn.execute(
        "SELECT n_dead_tup FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'jobs'",
        (schema,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def measure(dsn: str, jobs: int, dimensions: int) -> None:
    schema = new_schema("wal")
    config = WorkerConfig(
        database={"dsn": dsn, "schema": schema},
        queue={"name": "bench", "concurrency": 50},
        maintenance={"retention_seconds": 0.001, "vacuum_dead_rows": None},
        embedding={"dimensions": dimensions},
    )
    try:
        async with Queue(config) as queue:
            await queue.migrate(vector=False)
            conn = await AsyncConnection.connect(dsn, autocommit=True)
            await conn.execute(
                sql.SQL("ALTER TABLE {}.jobs SET (autovacuum_enabled = false)").format(
                    sql.Identifier(schema)
                )
            )
            start = await lsn(conn)
            await queue.enqueue_many([{"i": i} for i in range(jobs)])
            enqueued = await lsn(conn)
            await NoopWorker(config).run(until_empty=True, install_signal_handlers=False)
            drained = await lsn(conn)
            dead = await dead_rows(conn, schema)
            while await queue.prune(retention_seconds=0.0, limit=5000):
                pass
            pruned = await lsn(conn)
            dead_after_prune = await dead_rows(conn, schema)

            writer = ChunkWriter(schema=schema)
            rng = random.Random(7)
            chunks = jobs
            before_chunks = await lsn(conn)
            for doc in range(chunks // 10):
                batch = [
                    Chunk(f"doc-{doc}", i, "lorem ipsum " * 40,
                          embedding=[rng.random() for _ in range(dimensions)])
                    for i in range(10)
                ]  # fmt: skip
                async with conn.transaction():
                    await writer.write(conn, batch)
            after_chunks = await lsn(conn)
            await conn.close()
        print(
            f"PostgreSQL {server_version(dsn)}, {jobs:,} jobs, {chunks:,} chunks of {dimensions} dims"
        )
        print(f"WAL per job: enqueue {(enqueued - start) / jobs:,.0f} B, "
              f"claim+outcome {(drained - enqueued) / jobs:,.0f} B, "
              f"prune {(pruned - drained) / jobs:,.0f} B, "
              f"total {(pruned - start) / jobs:,.0f} B")  # fmt: skip
        print(f"dead row versions per job: {dead / jobs:.2f} after the drain, "
              f"{dead_after_prune / jobs:.2f} after pruning")  # fmt: skip
        print(f"WAL per chunk ({dimensions} dims, 480 chars): "
              f"{(after_chunks - before_chunks) / chunks:,.0f} B")  # fmt: skip
    finally:
        drop_schema(dsn, schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--dimensions", type=int, default=384)
    args = parser.parse_args()
    with database() as dsn:
        run(measure(dsn, args.jobs, args.dimensions))


if __name__ == "__main__":
    main()
