"""Bucket sync: enqueue one job per new or changed object and one delete per vanished one.

``await sync_prefix(queue, storage, prefix)`` streams the storage listing under
``prefix`` page by page. For each page it looks the keys up in
``<schema>.sync_objects`` (what earlier syncs recorded): a key not recorded is
new, a recorded key with another version changed. In one transaction per page
it enqueues their jobs with ``Queue.enqueue_many`` and records every key of the
page as seen now. Once the listing is complete, the keys under the prefix that
were not seen since the sync started have vanished: a delete job each, page by
page, and they are forgotten. Memory stays bounded by the page size, never by the
number of keys, and the listing may come in any order (S3 lists keys in byte
order, SeaweedFS folder by folder). A listing that fails half-way deletes nothing.

Dedupe keys (per document and version) keep a job that is still waiting from
being doubled, and the record keeps a re-run from enqueueing anything it already
did: re-running a sync enqueues nothing new, whether or not the jobs ran yet.

Ingest jobs use the storage key as ``document_id`` (a key the record already
maps to another document id keeps that id). Suits a scheduled job as well as
``worker-core sync PREFIX``.
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker_core.logs import StructuredLogger
from worker_core.queue import Queue

from .catalog import DocumentCatalog, ListedObject, dedupe_key
from .storage import ObjectInfo, VersionedStorage

__all__ = ["SyncResult", "sync_prefix"]

_log = StructuredLogger("worker_core.ingest.sync")


@dataclass
class SyncResult:
    """What one sync found and enqueued."""

    prefix: str
    listed: int = 0
    new: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    #: Keys no job can carry (a NUL character): logged and left alone.
    skipped: int = 0

    @property
    def jobs(self) -> int:
        """Jobs offered to the queue: one per new, changed and removed object."""
        return self.new + self.changed + self.removed

    def summary(self) -> str:
        return (
            f"listed {self.listed} objects under {self.prefix!r}: {self.new} new, "
            f"{self.changed} changed, {self.removed} removed, {self.unchanged} unchanged; "
            f"enqueued {self.jobs} jobs"
            + (f" ({self.skipped} keys skipped)" if self.skipped else "")
        )


async def sync_prefix(
    queue: Queue,
    storage: VersionedStorage,
    prefix: str = "",
    *,
    batch_size: int = 1000,
    queue_name: str | None = None,
) -> SyncResult:
    """Enqueue DocumentWorker jobs for what changed under ``prefix`` since the last sync.

    Args:
        queue: an open Queue on a migrated schema (its config names the schema).
        storage: an open ``VersionedStorage`` (``LocalStorage``, ``S3Storage``).
        prefix: a key prefix (not necessarily a folder); ``""`` is everything.
        batch_size: keys per transaction.
        queue_name: the queue the jobs go to (``queue.name`` by default).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    catalog = DocumentCatalog(queue.schema)
    result = SyncResult(prefix)
    async with queue.connection() as conn:
        started = await catalog.sync_started(conn)
    page: list[ObjectInfo] = []
    async with aclosing(storage.list_objects(prefix)) as listing:
        async for info in listing:
            if "\x00" in info.key:  # PostgreSQL text cannot hold it: one bad key must
                result.skipped += 1  # not stop the sync of all the others
                _log.warning("sync_key_skipped", key=repr(info.key)[:200], reason="NUL character")
                continue
            page.append(info)
            if len(page) >= batch_size:
                await _sync_page(queue, catalog, page, result, queue_name)
                page = []
    if page:
        await _sync_page(queue, catalog, page, result, queue_name)
    # Only a complete listing can tell what vanished.
    while await _sweep(queue, catalog, prefix, started, batch_size, result, queue_name):
        pass
    return result


async def _sync_page(
    queue: Queue,
    catalog: DocumentCatalog,
    page: list[ObjectInfo],
    result: SyncResult,
    queue_name: str | None,
) -> None:
    result.listed += len(page)
    async with queue.connection() as conn, conn.transaction():
        known = await catalog.listed(conn, [info.key for info in page])
        listed: list[ListedObject] = []
        todo: list[int] = []  # positions in ``listed`` that need a job
        for info in page:
            old = known.get(info.key)
            document_id = old.document_id if old is not None else info.key
            listed.append(ListedObject(info.key, document_id, info.version))
            if old is None:
                result.new += 1
            elif old.version != info.version:
                result.changed += 1
            else:
                result.unchanged += 1
                continue
            todo.append(len(listed) - 1)
        jobs: list[int | None] = [None] * len(listed)
        if todo:
            ids = await queue.enqueue_many(
                [
                    {"document_id": listed[i].document_id, "key": listed[i].storage_key}
                    for i in todo
                ],
                dedupe_keys=[
                    dedupe_key("ingest", listed[i].document_id, listed[i].version) for i in todo
                ],
                queue=queue_name,
                connection=conn,
            )
            for i, job_id in zip(todo, ids, strict=True):
                jobs[i] = job_id
        await catalog.record_listing(conn, list(zip(listed, jobs, strict=True)))


async def _sweep(
    queue: Queue,
    catalog: DocumentCatalog,
    prefix: str,
    started: datetime,
    batch_size: int,
    result: SyncResult,
    queue_name: str | None,
) -> bool:
    """Enqueue deletes for one page of vanished keys; whether there was one."""
    async with queue.connection() as conn, conn.transaction():
        gone = await catalog.vanished(conn, prefix, started, limit=batch_size)
        if not gone:
            return False
        payloads: list[dict[str, Any]] = [
            {"document_id": document_id, "key": key, "delete": True} for key, document_id in gone
        ]
        await queue.enqueue_many(
            payloads,
            dedupe_keys=[dedupe_key("delete", document_id) for _, document_id in gone],
            queue=queue_name,
            connection=conn,
        )
        await catalog.forget(conn, [key for key, _ in gone])
    result.removed += len(gone)
    return True
