"""``worker-core demo``: ingest sample documents end to end, with no server to install.

Without a DSN it starts an embedded PostgreSQL (the ``embedded`` extra) in a data
directory kept between runs, writes a few sample documents to local storage,
enqueues them, runs ``DocumentWorker`` with the hashing embedder behind a
progress bar, and prints the metrics and what happened to each document. Every
later run first revises one document (``doc-000.txt`` gains a paragraph): that
one is re-ingested, its old chunks replaced in one transaction, and the others
are found unchanged without being read.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from typing import IO, Any

from psycopg import sql

from .config import WorkerConfig
from .embedded import EmbeddedPostgres, default_data_dir
from .ingest import DocumentWorker, LocalStorage
from .jobs import Job
from .queue import Queue

__all__ = ["run_demo", "sample_documents"]

_WORDS = (  # noqa: SIM905 (a sentence reads better than a 32-line list)
    "ingestion worker queue lease stage checkpoint retry backoff jitter breaker circuit "
    "embedding vector chunk storage stream batch commit fence heartbeat rescue dead letter "
    "postgres index vacuum tuple snapshot replica throughput latency idempotent"
).split()


def sample_documents(n: int) -> dict[str, str]:
    """``n`` deterministic documents (``doc-000.txt`` ...) plus one empty, invalid one."""
    docs: dict[str, str] = {}
    for i in range(n):
        seed = hashlib.sha256(f"worker-core-demo-{i}".encode()).digest()
        paragraphs = []
        for p in range(8 + seed[0] % 8):
            words = [_WORDS[(seed[(p + k) % 32] + k * 7) % len(_WORDS)] for k in range(60)]
            paragraphs.append(" ".join(words).capitalize() + ".")
        docs[f"doc-{i:03d}.txt"] = f"Sample document {i}\n\n" + "\n\n".join(paragraphs) + "\n"
    docs["empty.txt"] = ""  # shows a dead letter with its reason
    return docs


class _DemoWorker(DocumentWorker):
    progress: Any = None
    written = 0
    replaced = 0

    async def on_job_done(self, job: Job) -> None:
        self.written += job.state.get("chunks", {}).get("written", 0)
        self.replaced += job.state.get("replaced", 0)
        self.progress.update(1)

    async def on_dead_letter(self, job: Job, exc: BaseException) -> None:
        self.progress.update(1)


async def _chunk_count(queue: Queue) -> int:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT count(*) FROM {}.current_chunks").format(sql.Identifier(queue.schema))
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def run_demo(args: argparse.Namespace, out: IO[str]) -> int:
    dsn = args.dsn or os.environ.get("WORKER_CORE_DATABASE__DSN")
    server: EmbeddedPostgres | None = None
    if not dsn:
        data_dir = args.data_dir or default_data_dir("demo")
        server = EmbeddedPostgres(data_dir)
        already = server.is_running()
        out.write(f"starting embedded PostgreSQL in {data_dir}\n")
        dsn = server.start()
        if already:
            server = None  # someone else's server: leave it running
    try:
        return await _ingest(args, dsn, out)
    finally:
        if server is not None:
            server.stop()


async def _ingest(args: argparse.Namespace, dsn: str, out: IO[str]) -> int:
    from tqdm import tqdm

    storage_dir = args.storage_dir or (
        (args.data_dir or default_data_dir("demo")).parent / "demo-documents"
    )
    config = WorkerConfig.model_validate(
        {
            "database": {"dsn": dsn, "schema": args.schema or "worker_core_demo"},
            "queue": {"name": args.queue_name or "demo", "concurrency": 4, "poll_interval": 0.5},
            "storage": {"backend": "local", "local_root": storage_dir},
            "embedding": {"provider": "hashing", "dimensions": 384},
            "ingest": {"chunk_size": 400, "chunk_overlap": 40},
        }
    )
    storage = LocalStorage(storage_dir)
    documents = sample_documents(max(1, args.documents))
    existing = 0
    for key, text in documents.items():
        if await storage.exists(key):
            existing += 1
        else:
            await storage.put(key, text.encode())
    out.write(f"{len(documents)} documents in {storage_dir}\n")
    if existing == len(documents):  # a later run: revise one document
        revised = await _revise(storage, "doc-000.txt")
        out.write(f"revised doc-000.txt (revision {revised}) since the last run\n")
    async with Queue(config) as queue:
        await queue.migrate()
        await queue.enqueue_many(
            [{"document_id": key.removesuffix(".txt"), "key": key} for key in documents],
            dedupe_keys=[key for key in documents],
        )
        worker = _DemoWorker(config, storage=storage)
        with tqdm(total=len(documents), desc="ingesting", unit="doc") as bar:
            worker.progress = bar
            await worker.run(until_empty=True)
        after = await _chunk_count(queue)
        dead = await queue.dead_letters(config.queue.primary, limit=5)
    summary = worker.metrics.summary()
    out.write(
        f"jobs: {summary['processed']} succeeded, {summary['dead_lettered']} dead-lettered, "
        f"{summary['retried']} retried; {summary['avg_seconds'] * 1000:.1f} ms per job on average\n"
    )
    for name, stage in summary["stages"].items():
        out.write(
            f"  stage {name:<9} {stage['completed']} completed, {stage['failed']} failed, "
            f"{stage['avg_seconds'] * 1000:.1f} ms average\n"
        )
    for job in dead[:1]:
        reason = job.last_error["message"] if job.last_error else "?"
        out.write(f"dead letter #{job.id} ({job.payload.get('key')}): {reason}\n")
    done = worker.outcomes
    out.write(
        f"documents: {done['ingested']} new, {done['replaced']} re-ingested "
        f"({worker.replaced} chunks replaced), {done['unchanged']} unchanged\n"
    )
    out.write(f"chunks: {after} current, {worker.written} written by this run\n")
    return 0


async def _revise(storage: LocalStorage, key: str) -> int:
    """Append a paragraph to ``key``; returns the revision number it carries."""
    chunks = []
    async for piece in storage.open_stream(key):
        chunks.append(piece)
    text = b"".join(chunks).decode()
    revision = text.count("\nRevision ") + 1
    text += f"\nRevision {revision}: " + " ".join(_WORDS[revision % 7 :: 3]) + ".\n"
    await storage.put(key, text.encode())
    return revision
