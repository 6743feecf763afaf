"""Bucket sync on a real PostgreSQL: local storage with 10,000 objects and a real S3 endpoint."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from worker_core import JobStatus, Queue, WorkerConfig
from worker_core.cli import main
from worker_core.ingest.document_worker import DocumentWorker
from worker_core.ingest.storage import LocalStorage, ObjectInfo, S3Storage
from worker_core.ingest.sync import SyncResult, sync_prefix


async def total_jobs(queue: Queue) -> int:
    return sum((await queue.stats()).values())


async def payloads_after(queue: Queue, job_id: int) -> list[dict[str, Any]]:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT payload FROM {}.jobs WHERE id > %s ORDER BY id").format(
                sql.Identifier(queue.schema)
            ),
            (job_id,),
        )
        return [row[0] for row in await cur.fetchall()]


async def last_job_id(queue: Queue) -> int:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT coalesce(max(id), 0) FROM {}.jobs").format(sql.Identifier(queue.schema))
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0


def write_corpus(root: Path, n: int) -> None:
    for i in range(n):
        folder = root / "corpus" / f"{i % 100:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"doc-{i:05d}.txt").write_text(f"document {i}\n")


@pytest.mark.timeout(300)
async def test_sync_of_10000_objects_enqueues_exactly_the_differences(
    queue: Queue, tmp_path: Path
) -> None:
    write_corpus(tmp_path, 10_000)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.txt").write_text("outside the prefix")
    storage = LocalStorage(tmp_path)

    first = await sync_prefix(queue, storage, "corpus/")
    assert first == SyncResult("corpus/", listed=10_000, new=10_000)
    assert await total_jobs(queue) == 10_000

    # 100 changed (new content), 50 removed.
    files = sorted((tmp_path / "corpus").rglob("*.txt"))
    changed, removed = files[:100], files[100:150]
    for path in changed:
        stat = path.stat()
        path.write_text(path.read_text() + "changed\n")
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    for path in removed:
        path.unlink()
    mark = await last_job_id(queue)

    second = await sync_prefix(queue, storage, "corpus/", batch_size=700)
    assert (second.listed, second.new, second.changed, second.removed, second.unchanged) == (
        9_950, 0, 100, 50, 9_850,
    )  # fmt: skip
    assert await total_jobs(queue) == 10_150  # exactly 150 new jobs
    new_jobs = await payloads_after(queue, mark)

    def keys(paths: list[Path]) -> set[str]:
        return {str(p.relative_to(tmp_path)) for p in paths}

    assert {p["key"] for p in new_jobs if not p.get("delete")} == keys(changed)
    assert {p["document_id"] for p in new_jobs if p.get("delete")} == keys(removed)

    # Again, with nothing changed: nothing new, although no job has run yet.
    third = await sync_prefix(queue, storage, "corpus/")
    assert (third.jobs, third.unchanged) == (0, 9_950)
    assert await total_jobs(queue) == 10_150
    # A prefix is a key prefix, not a folder: a narrower one sees its part only.
    (tmp_path / "corpus" / "07" / "doc-new.txt").write_text("new")
    narrow = await sync_prefix(queue, storage, "corpus/07/doc-new")
    assert (narrow.listed, narrow.new, narrow.removed) == (1, 1, 0)


@pytest.mark.s3
async def test_sync_then_ingest_end_to_end_on_s3(
    queue: Queue, make_config: Callable[..., WorkerConfig], s3_endpoint: Any, s3_bucket: str
) -> None:
    config = make_config(
        storage={"backend": "s3", "bucket": s3_bucket, "prefix": "bucket-root",
                 "endpoint_url": s3_endpoint.url, "access_key_id": s3_endpoint.access_key,
                 "secret_access_key": s3_endpoint.secret_key},
    )  # fmt: skip
    async with S3Storage.from_settings(config.storage) as storage:
        for i in range(30):
            await storage.put(f"in/{i % 3}/doc-{i:02d}.txt", (f"document {i} " * 50).encode())
        await storage.put("out/other.txt", b"not synced")
        first = await sync_prefix(queue, storage, "in/")
        assert (first.new, first.jobs) == (30, 30)
        worker = DocumentWorker(config)
        await worker.run(until_empty=True, install_signal_handlers=False)
        assert (await queue.stats())["succeeded"] == 30
        assert worker.outcomes["ingested"] == 30

        await storage.open()
        for i in (0, 1, 2):
            await storage.put(f"in/{i}/doc-{i:02d}.txt", (f"document {i}, revised " * 40).encode())
        for i in (3, 4):
            await storage.client.delete_object(
                Bucket=s3_bucket, Key=storage.key(f"in/{i % 3}/doc-{i:02d}.txt")
            )
        second = await sync_prefix(queue, storage, "in/")
        assert (second.changed, second.removed, second.unchanged, second.jobs) == (3, 2, 25, 5)
        assert (await sync_prefix(queue, storage, "in/")).jobs == 0
        await worker.run(until_empty=True, install_signal_handlers=False)
    stats = await queue.stats()
    assert stats["succeeded"] == 35 and stats["dead"] == 0
    assert worker.outcomes["replaced"] == 3 and worker.outcomes["deleted"] == 2
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL("SELECT document_id, count(*) FROM {}.current_chunks GROUP BY 1").format(
                sql.Identifier(queue.schema)
            )
        )
        current = dict(await cur.fetchall())
    assert len(current) == 28 and "in/0/doc-03.txt" not in current
    revised = await queue.enqueue({"document_id": "in/0/doc-00.txt", "key": "in/0/doc-00.txt"})
    await worker.run(until_empty=True, install_signal_handlers=False)
    job = await queue.get(revised)
    assert job is not None and job.status is JobStatus.SUCCEEDED
    assert job.state["outcome"] == "unchanged"


def test_sync_command(
    pg_dsn: str, schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_CORE_STORAGE__LOCAL_ROOT", str(tmp_path))
    for i in range(5):
        (tmp_path / f"d{i}.txt").write_text(f"doc {i}")
    base = ["--dsn", pg_dsn, "--schema", schema, "--queue", "docs"]
    assert main([*base, "migrate"], stdout=io.StringIO(), stderr=io.StringIO()) == 0
    out = io.StringIO()
    assert main([*base, "sync", ""], stdout=out, stderr=io.StringIO()) == 0
    assert out.getvalue() == (
        "listed 5 objects under '': 5 new, 0 changed, 0 removed, 0 unchanged; "
        "enqueued 5 jobs on 'docs'\n"
    )
    (tmp_path / "d0.txt").unlink()
    out = io.StringIO()
    assert main([*base, "sync", "", "--json"], stdout=out, stderr=io.StringIO()) == 0
    assert '"removed": 1' in out.getvalue() and '"jobs": 1' in out.getvalue()
    err = io.StringIO()
    assert main([*base, "sync", "../x"], stdout=io.StringIO(), stderr=err) == 1
    assert "escapes the storage root" in err.getvalue()


class WithABadKey(LocalStorage):
    """A listing with a key no PostgreSQL text can hold (S3 allows control characters)."""

    async def list_objects(self, prefix: str = "") -> AsyncGenerator[ObjectInfo, None]:
        yield ObjectInfo("bad\x00key.txt", "1-1", 1)
        async for info in super().list_objects(prefix):
            yield info


async def test_a_key_no_job_can_carry_is_skipped_not_fatal(queue: Queue, tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("fine")
    result = await sync_prefix(queue, WithABadKey(tmp_path))
    assert (result.new, result.skipped) == (1, 1)
    assert "(1 keys skipped)" in result.summary()
