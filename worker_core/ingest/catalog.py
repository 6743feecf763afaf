"""The documents catalog: versions, the atomic switch, deletes, pending embeddings.

``<schema>.documents`` holds one row per document: its current version, when that
version was pinned (first read, on the database's clock), whether it is deleted
and whether its embeddings await a backfill. ``<schema>.current_chunks`` joins it
with the chunks table: readers query that view and see, for every document, the
chunks of exactly one complete version.

Ordering rule: of two reads of one document, the one pinned later saw a newer
state of the object. Finalize therefore switches a document to a version only if
no later pin (another read, or a delete) was made current before it; otherwise
the read is *superseded* and its chunks are discarded. A delete is a pin too.

Also the memory of a bucket sync (``<schema>.sync_objects``): what the last
listing of each key was, so a sync enqueues only differences.

SQL lives in ``sql/documents.sql``; this module is the only one that runs it.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from psycopg import AsyncConnection

from worker_core.errors import PermanentError
from worker_core.sql import load_queries, render
from worker_core.writes import ChunkWriter, DocumentCounts

__all__ = [
    "DocumentCatalog",
    "DocumentRecord",
    "Finalized",
    "ListedObject",
    "Outcome",
    "dedupe_key",
]


class Outcome(enum.StrEnum):
    """What one job did to its document; recorded as ``state["outcome"]``."""

    #: The first version of the document became current.
    INGESTED = "ingested"
    #: A new version replaced the current one.
    REPLACED = "replaced"
    #: The version read is the current one: nothing was written.
    UNCHANGED = "unchanged"
    #: A read pinned later (or a delete) was already current: this read was discarded.
    SUPERSEDED = "superseded"
    #: The document's chunks were removed and the document marked deleted.
    DELETED = "deleted"
    #: The document was deleted before; nothing to do.
    ALREADY_DELETED = "already_deleted"
    #: The document was never ingested; a tombstone records the delete.
    NOT_INGESTED = "not_ingested"


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    """A document's row: its current version and state."""

    version: str
    pinned_at: datetime
    deleted: bool
    chunks: int
    embeddings_pending: bool


@dataclass(frozen=True, slots=True)
class Finalized:
    """The result of ``DocumentCatalog.finalize``."""

    outcome: Outcome
    #: Chunks of other versions removed by the switch.
    replaced: int = 0
    #: The document awaits embeddings (searchable by text meanwhile).
    embeddings_pending: bool = False


class ListedObject(NamedTuple):
    """A key as the last sync listed it."""

    storage_key: str
    document_id: str
    version: str


class DocumentCatalog:
    """Reads and writes ``<schema>.documents`` (and ``sync_objects``); owns no connection.

    Args:
        schema: the worker_core schema.
        writer: the ChunkWriter whose counts finalize verifies.
    """

    def __init__(self, schema: str = "worker_core", writer: ChunkWriter | None = None) -> None:
        self.schema = schema
        self.writer = writer or ChunkWriter(schema)
        self._sql = {
            name: render(text, schema).as_bytes(None) for name, text in load_queries(_FILE).items()
        }

    def __repr__(self) -> str:
        return f"DocumentCatalog(schema={self.schema!r})"

    async def _one(self, conn: AsyncConnection[Any], name: str, **params: Any) -> Any:
        cur = await conn.execute(self._sql[name], params)
        return await cur.fetchone()

    async def _count(self, conn: AsyncConnection[Any], name: str, **params: Any) -> int:
        cur = await conn.execute(self._sql[name], params)
        return max(cur.rowcount, 0)

    # -- reads -------------------------------------------------------------------
    async def pin(
        self, conn: AsyncConnection[Any], document_id: str
    ) -> tuple[datetime, DocumentRecord | None]:
        """The database's time now (the pin of a read starting now) and the document."""
        row = await self._one(conn, "pin", document_id=document_id)
        pinned_at, version, current_pinned_at, deleted, chunks, pending = row
        if version is None:
            return pinned_at, None
        return pinned_at, DocumentRecord(version, current_pinned_at, deleted, chunks, pending)

    async def document(self, conn: AsyncConnection[Any], document_id: str) -> DocumentRecord | None:
        row = await self._one(conn, "document", document_id=document_id)
        return DocumentRecord(*row) if row else None

    async def pending(
        self, conn: AsyncConnection[Any], *, after: str = "", limit: int = 1000
    ) -> list[tuple[str, str]]:
        """Up to ``limit`` (document_id, version) awaiting embeddings, after ``after``."""
        cur = await conn.execute(self._sql["pending_documents"], {"after": after, "limit": limit})
        return [(r[0], r[1]) for r in await cur.fetchall()]

    # -- writes ------------------------------------------------------------------
    async def discard(self, conn: AsyncConnection[Any], document_id: str, version: str) -> int:
        """Remove the chunks of ``version`` unless it is the current version; how many."""
        return await self._count(conn, "discard_version", document_id=document_id, version=version)

    async def _lock(
        self, conn: AsyncConnection[Any], document_id: str, storage_key: str
    ) -> tuple[DocumentRecord, bool]:
        """Lock the document's row, creating a placeholder first; (row, was created)."""
        created = await self._one(
            conn, "ensure_document", document_id=document_id, storage_key=storage_key
        )
        row = await self._one(conn, "lock_document", document_id=document_id)
        return DocumentRecord(*row), created is not None

    async def finalize(
        self,
        conn: AsyncConnection[Any],
        *,
        document_id: str,
        storage_key: str,
        version: str,
        pinned_at: datetime,
        chunks: int,
        job_id: int | None,
        model: str | None = None,
        allow_pending: bool = False,
    ) -> Finalized:
        """Make ``version`` current (or find it unchanged or superseded), in one transaction.

        Verifies first that the version's chunks are all stored (``chunks`` of them,
        no gap) and embedded by ``model``; with ``allow_pending`` chunks without a
        vector are allowed and the document is marked as awaiting embeddings.

        Raises:
            PermanentError: the chunks table does not hold the version completely.
        """
        # Statements go out in pipelines: one round trip per step, not per statement.
        key = {"document_id": document_id}
        async with conn.pipeline():
            cur = await conn.execute(self._sql["document"], key)
            counts = await self.writer.counts(conn, document_id, version=version, model=model)
            row = await cur.fetchone()
        current = DocumentRecord(*row) if row else None
        if current is not None and current.version == version and not current.deleted:
            # Unchanged: read-only, so no lock, no write and no commit to wait for.
            pending = _check(document_id, version, chunks, model, allow_pending, counts)
            if pending == current.embeddings_pending:
                return Finalized(Outcome.UNCHANGED, embeddings_pending=pending)
        async with conn.transaction():
            async with conn.pipeline():
                ensured = await conn.execute(
                    self._sql["ensure_document"], {**key, "storage_key": storage_key}
                )
                locked = await conn.execute(self._sql["lock_document"], key)
                # After the lock: no finalize of this document can change them now.
                counts = await self.writer.counts(conn, document_id, version=version, model=model)
                created = await ensured.fetchone() is not None
                old = DocumentRecord(*(await locked.fetchone() or ()))
            unchanged = old.version == version and not old.deleted
            if not unchanged and pinned_at < old.pinned_at:
                await self.discard(conn, document_id, version)
                return Finalized(Outcome.SUPERSEDED)
            pending = _check(document_id, version, chunks, model, allow_pending, counts)
            if unchanged:
                await self._count(conn, "set_pending", **key, pending=pending)
                return Finalized(Outcome.UNCHANGED, embeddings_pending=pending)
            async with conn.pipeline():
                await conn.execute(
                    self._sql["make_current"],
                    {**key, "storage_key": storage_key, "version": version,
                     "pinned_at": pinned_at, "chunks": chunks, "job_id": job_id,
                     "pending": pending},
                )  # fmt: skip
                dropped = await conn.execute(
                    self._sql["drop_replaced_chunks"],
                    {**key, "version": version, "old_version": old.version,
                     "pinned_at": pinned_at},
                )  # fmt: skip
            replaced = max(dropped.rowcount, 0)
        outcome = Outcome.INGESTED if created or old.deleted else Outcome.REPLACED
        return Finalized(outcome, replaced, pending)

    async def delete(
        self, conn: AsyncConnection[Any], document_id: str, storage_key: str = ""
    ) -> tuple[Outcome, int]:
        """Remove every chunk of the document and mark it deleted; (outcome, chunks removed).

        Idempotent: a second delete removes nothing and says so.
        """
        async with conn.transaction():
            old, created = await self._lock(conn, document_id, storage_key)
            removed = await self._count(conn, "delete_chunks", document_id=document_id)
            await self._count(conn, "mark_deleted", document_id=document_id)
        if created:
            return Outcome.NOT_INGESTED, removed
        return (Outcome.ALREADY_DELETED if old.deleted else Outcome.DELETED), removed

    # -- the sync's memory -------------------------------------------------------
    async def sync_started(self, conn: AsyncConnection[Any]) -> datetime:
        """The database's time now: a sync's keys not marked seen since are vanished."""
        row = await self._one(conn, "sync_started")
        started: datetime = row[0]
        return started

    async def listed(
        self, conn: AsyncConnection[Any], keys: Sequence[str]
    ) -> dict[str, ListedObject]:
        """What earlier syncs recorded for ``keys``."""
        cur = await conn.execute(self._sql["listed_keys"], {"keys": list(keys)})
        return {row[0]: ListedObject(*row) for row in await cur.fetchall()}

    async def record_listing(
        self, conn: AsyncConnection[Any], seen: Sequence[tuple[ListedObject, int | None]]
    ) -> None:
        """Remember listed objects, marked seen now (with the job enqueued for them)."""
        if seen:
            await conn.execute(
                self._sql["record_listed"],
                {
                    "keys": [obj.storage_key for obj, _ in seen],
                    "documents": [obj.document_id for obj, _ in seen],
                    "versions": [obj.version for obj, _ in seen],
                    "jobs": [job for _, job in seen],
                },
            )

    async def vanished(
        self, conn: AsyncConnection[Any], prefix: str, started: datetime, *, limit: int = 1000
    ) -> list[tuple[str, str]]:
        """Up to ``limit`` (storage_key, document_id) under ``prefix`` unseen since ``started``."""
        cur = await conn.execute(
            self._sql["vanished_keys"],
            {"prefix": prefix, "upper": prefix_upper(prefix), "started": started, "limit": limit},
        )
        return [(row[0], row[1]) for row in await cur.fetchall()]

    async def forget(self, conn: AsyncConnection[Any], keys: Sequence[str]) -> None:
        if keys:
            await conn.execute(self._sql["forget_listed"], {"keys": list(keys)})


def _check(
    document_id: str,
    version: str,
    expected: int,
    model: str | None,
    allow_pending: bool,
    counts: DocumentCounts,
) -> bool:
    """Whether the version's chunks are complete (else ``PermanentError``) and some
    still lack an embedding."""
    problem = None
    if counts.chunks != expected or counts.next_index != expected:
        problem = (
            f"holds {counts.chunks} chunks of version {version!r} (indexes up to "
            f"{counts.next_index - 1}) but the document has {expected}"
        )
    elif counts.embedded != counts.chunks and not allow_pending:
        problem = (
            f"has {counts.chunks - counts.embedded} chunks of version {version!r} "
            f"without an embedding of model {model!r}"
        )
    if problem is not None:
        raise PermanentError(
            f"document {document_id!r}: the chunks table {problem}",
            document_id=document_id,
            version=version,
            expected=expected,
            stored=counts.chunks,
            embedded=counts.embedded,
        )
    return counts.embedded != counts.chunks


def dedupe_key(action: str, document_id: str, version: str = "") -> str:
    """The dedupe key of a job about one document (and version): readable when short,
    a digest when the key or id is long (index entries have a size limit)."""
    text = f"{action}:{version}:{document_id}" if version else f"{action}:{document_id}"
    if len(text) <= 512:
        return text
    return f"{action}:sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def prefix_upper(prefix: str) -> str | None:
    """The first string after every string that starts with ``prefix`` (code point
    order, which is UTF-8 byte order); ``None`` when there is none."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        nxt = last + 1
        if 0xD800 <= nxt <= 0xDFFF:  # surrogates are not characters
            nxt = 0xE000
        if nxt <= 0x10FFFF:
            return "".join(chars) + chr(nxt)
    return None


_FILE = "documents.sql"
