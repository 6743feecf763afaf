"""Ingestion: the idempotent chunk write rate against a plain COPY, and one large document.

1. ChunkWriter.write of --rows chunks (about 800 characters each, 384-dimension
   embeddings) in batches of --batch, one transaction per batch, on one
   connection; in the same run and on the same table, the ceiling: a plain binary
   COPY of the same kind of rows straight into the table (no staging table, no
   conflict handling, so it could not be replayed). Runs alternate. Also the rate
   with the optimistic direct COPY turned off (every batch through the staging
   table) and of replaying batches already stored (everything skipped).
   Target: >= 20,000 rows/s.
2. One generated --size-mb MB document ingested end to end by DocumentWorker
   (local storage, HashingEmbedder) in a child process, whose peak RSS is
   printed. Target: < 200 MB.
3. Re-ingest: a corpus of --corpus documents (about 8 KB, some 10 chunks each)
   ingested end to end, then 10 % of them changed and every document enqueued
   again. Changed documents are read, chunked, embedded and switched to their new
   version (the old chunks deleted in the same transaction); unchanged ones are
   recognised by their version without being read. Printed: chunk rows written
   and replaced per second, documents per second, for both runs.

    python bench/ingest.py [--rows 50000] [--batch 1000] [--repeat 3] [--size-mb 200]
                           [--corpus 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _common import database, drop_schema, new_schema, run, server_version, summary
from psycopg import AsyncConnection, sql
from psycopg.adapt import Dumper
from psycopg.pq import Format

from worker_core import Queue, WorkerConfig
from worker_core.writes import Chunk, ChunkWriter, pack_vector

DIMS = 384
WORDS = [
    "queue", "lease", "worker", "stage", "chunk", "vector", "storage", "stream", "retry",
    "breaker", "document", "ingest", "embed", "commit", "index", "table", "schema", "batch",
    "offset", "cursor", "über", "naïve", "café", "résumé", "€uro", "𝄞", "data", "model",
]  # fmt: skip


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
    return " ".join(words).capitalize() + ". "


def paragraph(rng: random.Random, chars: int) -> str:
    out = ""
    while len(out) < chars:
        out += sentence(rng)
    return out[:chars]


# -- 1. write rate -----------------------------------------------------------------
class _PackedBinary(Dumper):
    format = Format.BINARY

    def dump(self, obj: Any) -> bytes:
        return obj  # type: ignore[no-any-return]


async def copy_ceiling(
    conn: AsyncConnection[Any], schema: str, batches: list[list[Chunk]], vector_oid: int
) -> float:
    dumpers = [
        type("V", (_PackedBinary,), {"oid": vector_oid}),
        type("J", (_PackedBinary,), {"oid": 3802}),
    ]
    statement = sql.SQL(
        "COPY {}.chunks (id, document_id, chunk_index, content, embedding, metadata) "
        "FROM STDIN (FORMAT BINARY)"
    ).format(sql.Identifier(schema))
    rows = 0
    started = time.perf_counter()
    for batch in batches:
        async with conn.transaction(), conn.cursor() as cur:
            for dumper in dumpers:
                cur.adapters.register_dumper(None, dumper)
            async with cur.copy(statement) as copy:
                copy.set_types([2950, 25, 23, 25, vector_oid, 3802])
                for c in batch:
                    assert c.embedding is not None
                    await copy.write_row(
                        (
                            c.id,
                            c.document_id,
                            c.index,
                            c.content,
                            pack_vector(c.embedding),
                            b"\x01{}",
                        )
                    )
        rows += len(batch)
    return rows / (time.perf_counter() - started)


async def writer_rate(
    conn: AsyncConnection[Any], writer: ChunkWriter, batches: list[list[Chunk]]
) -> tuple[float, int]:
    inserted = 0
    rows = 0
    started = time.perf_counter()
    for batch in batches:
        result = await writer.write(conn, batch)
        inserted += result.inserted
        rows += len(batch)
    return rows / (time.perf_counter() - started), inserted


def make_batches(
    rows: int, batch: int, texts: list[str], vectors: list[list[float]]
) -> list[list[Chunk]]:
    document = uuid.uuid4().hex
    chunks = [
        Chunk(document, i, texts[i % len(texts)], vectors[i % len(vectors)]) for i in range(rows)
    ]
    return [chunks[i : i + batch] for i in range(0, rows, batch)]


async def write_rates(dsn: str, rows: int, batch: int, repeat: int) -> None:
    schema = new_schema("bench_ingest")
    config = WorkerConfig(database={"dsn": dsn, "schema": schema})
    rng = random.Random(7)
    texts = [paragraph(rng, 800) for _ in range(500)]
    vectors = [[rng.uniform(-1, 1) for _ in range(DIMS)] for _ in range(64)]
    writer = ChunkWriter(schema, dimensions=DIMS)
    staging = ChunkWriter(schema, dimensions=DIMS, optimistic=False)
    lib: list[float] = []
    staged: list[float] = []
    ceiling: list[float] = []
    replay: list[float] = []
    try:
        async with Queue(config) as queue:
            await queue.migrate()
            async with await AsyncConnection.connect(dsn, autocommit=True) as conn:
                column = await writer.embedding_column(conn)
                cur = await conn.execute(
                    "SELECT atttypid::int FROM pg_attribute WHERE attrelid = %s::regclass "
                    "AND attname = 'embedding'",
                    (f'"{schema}".chunks',),
                )
                row = await cur.fetchone()
                assert row is not None
                print(
                    f"embedding column: {column.kind}({column.dimensions}); {rows:,} rows per run, batches of {batch:,}"
                )
                # Warm-up: catalog reads, prepared statements, the first pages.
                await writer.write(conn, make_batches(batch, batch, texts, vectors)[0])
                for _ in range(repeat):
                    batches = make_batches(rows, batch, texts, vectors)
                    rate, inserted = await writer_rate(conn, writer, batches)
                    assert inserted == rows
                    lib.append(rate)
                    replayed, inserted = await writer_rate(conn, writer, batches)
                    assert inserted == 0
                    replay.append(replayed)
                    rate, inserted = await writer_rate(
                        conn, staging, make_batches(rows, batch, texts, vectors)
                    )
                    assert inserted == rows
                    staged.append(rate)
                    ceiling.append(
                        await copy_ceiling(
                            conn, schema, make_batches(rows, batch, texts, vectors), row[0]
                        )
                    )
    finally:
        drop_schema(dsn, schema)
    ratio = statistics.median(lib) / statistics.median(ceiling)
    verdict = "OK" if statistics.median(lib) >= 20_000 else "MISSED"
    print(f"plain binary COPY ceiling:            {summary(ceiling)} rows/s")
    print(
        f"ChunkWriter.write, new rows:          {summary(lib)} rows/s; target >= 20,000 {verdict}"
    )
    print(f"  the same, always staged (optimistic=False): {summary(staged)} rows/s")
    print(f"ChunkWriter.write, all rows skipped:  {summary(replay)} rows/s")
    print(
        f"ChunkWriter / plain COPY: {ratio:.0%} "
        f"(always staged: {statistics.median(staged) / statistics.median(ceiling):.0%})"
    )


# -- 2. one large document ---------------------------------------------------------
def write_document(path: Path, size: int) -> None:
    rng = random.Random(11)
    blocks = [
        "\n\n".join(paragraph(rng, rng.randint(300, 2500)) for _ in range(400)) for _ in range(8)
    ]
    written = 0
    section = 0
    with path.open("w", encoding="utf-8") as out:
        while written < size:
            text = f"\n\n# Section {section}\n\n" + blocks[section % len(blocks)]
            data = text.encode()[: size - written]
            out.write(data.decode("utf-8", "ignore"))
            written += len(data)
            section += 1


async def ingest_child(dsn: str, schema: str, root: str) -> dict[str, Any]:
    from worker_core.ingest.document_worker import DocumentWorker

    config = WorkerConfig(
        database={"dsn": dsn, "schema": schema},
        queue={"name": "bench"},
        storage={"backend": "local", "local_root": root},
    )
    async with Queue(config) as queue:
        job_id = await queue.enqueue({"document_id": "big", "key": "big.txt"})
    worker = DocumentWorker(config, batch_size=1000, embed_batch_size=500)
    started = time.perf_counter()
    await worker.run(until_empty=True, install_signal_handlers=False)
    elapsed = time.perf_counter() - started
    async with Queue(config) as queue:
        job = await queue.get(job_id)
    assert job is not None
    return {
        "status": job.status.value,
        "seconds": elapsed,
        "chunks": job.state.get("chunk_count"),
        "stages": worker.metrics.summary()["stages"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


async def large_document(dsn: str, size_mb: int) -> None:
    schema = new_schema("bench_doc")
    with tempfile.TemporaryDirectory(prefix="wc-bench-") as root:
        path = Path(root) / "big.txt"
        write_document(path, size_mb * 1_000_000)
        size = path.stat().st_size
        try:
            async with Queue(WorkerConfig(database={"dsn": dsn, "schema": schema})) as queue:
                await queue.migrate()
            # A child process, so that its peak RSS is the worker's alone.
            child = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, __file__, "--child", dsn, schema, root],
                check=True,
                capture_output=True,
                text=True,
            )
        finally:
            drop_schema(dsn, schema)
    result = json.loads(child.stdout.strip().splitlines()[-1])
    stages = ", ".join(f"{k} {v['avg_seconds']:.1f} s" for k, v in result["stages"].items())
    verdict = "OK" if result["peak_rss_mb"] < 200 else "MISSED"
    print(
        f"one {size / 1e6:,.0f} MB document: {result['status']}, {result['chunks']:,} chunks "
        f"in {result['seconds']:.1f} s ({stages}); {size / 1e6 / result['seconds']:.1f} MB/s"
    )
    print(
        f"peak RSS of the worker process: {result['peak_rss_mb']:.0f} MB; target < 200 MB {verdict}"
    )


# -- 3. re-ingest of a changed corpus ------------------------------------------------
class _Tally:
    """Chunk rows written and replaced by a run's jobs (from their final state)."""

    def __init__(self) -> None:
        self.written = 0
        self.replaced = 0

    async def on_job_done(self, job: Any) -> None:
        self.written += job.state.get("chunks", {}).get("written", 0)
        self.replaced += job.state.get("replaced", 0)


async def _ingest_all(config: WorkerConfig, n: int) -> tuple[float, Any, _Tally]:
    from worker_core.ingest.document_worker import DocumentWorker

    tally = _Tally()

    class Worker(DocumentWorker):
        async def on_job_done(self, job: Any) -> None:
            await tally.on_job_done(job)

    async with Queue(config) as queue:
        await queue.enqueue_many(
            [{"document_id": f"doc-{i}", "key": f"d{i:05d}.txt"} for i in range(n)]
        )
    worker = Worker(config, batch_size=1000, embed_batch_size=256)
    started = time.perf_counter()
    await worker.run(until_empty=True, install_signal_handlers=False)
    return time.perf_counter() - started, worker, tally


def write_corpus(root: str, n: int, rng: random.Random) -> None:
    for i in range(n):
        Path(root, f"d{i:05d}.txt").write_text(paragraph(rng, 8000), encoding="utf-8")


def revise(root: str, indexes: list[int]) -> None:
    for i in indexes:
        path = Path(root, f"d{i:05d}.txt")
        path.write_text(path.read_text(encoding="utf-8") + " Revised.", encoding="utf-8")


async def reingest(dsn: str, n: int) -> None:
    schema = new_schema("bench_reingest")
    rng = random.Random(13)
    with tempfile.TemporaryDirectory(prefix="wc-bench-") as root:
        await asyncio.to_thread(write_corpus, root, n, rng)
        config = WorkerConfig(
            database={"dsn": dsn, "schema": schema},
            queue={"name": "bench", "concurrency": 8},
            storage={"backend": "local", "local_root": root},
        )
        try:
            async with Queue(config) as queue:
                await queue.migrate()
            first, worker, tally = await _ingest_all(config, n)
            assert worker.outcomes["ingested"] == n, worker.outcomes
            print(
                f"first ingest of {n:,} documents: {first:.1f} s, {tally.written:,} chunk rows "
                f"({tally.written / first:,.0f} rows/s, {n / first:,.0f} documents/s)"
            )
            changed = rng.sample(range(n), n // 10)
            await asyncio.to_thread(revise, root, changed)
            again, worker, tally = await _ingest_all(config, n)
            outcomes = dict(worker.outcomes)
            assert outcomes.get("replaced") == len(changed), outcomes
            rows = tally.written + tally.replaced
            print(
                f"re-ingest with 10 % changed: {again:.1f} s; {outcomes['replaced']:,} re-ingested "
                f"({tally.written:,} chunk rows written, {tally.replaced:,} replaced: "
                f"{rows / again:,.0f} rows/s), {outcomes.get('unchanged', 0):,} unchanged; "
                f"{n / again:,.0f} documents/s"
            )
        finally:
            drop_schema(dsn, schema)


async def main(rows: int, batch: int, repeat: int, size_mb: int, corpus: int) -> None:
    with database() as dsn:
        print(f"PostgreSQL {server_version(dsn)}")
        if rows:
            await write_rates(dsn, rows, batch, repeat)
        if size_mb:
            await large_document(dsn, size_mb)
        if corpus:
            await reingest(dsn, corpus)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(asyncio.run(ingest_child(*sys.argv[2:5]))))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=50_000, help="0 skips the write rates")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=200, help="0 skips the large document")
    parser.add_argument("--corpus", type=int, default=2000, help="0 skips the re-ingest")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run(main(args.rows, args.batch, args.repeat, args.size_mb, args.corpus))
