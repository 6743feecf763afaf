"""The stages of DocumentWorker: ``chunk``, ``embed`` and ``finalize``.

Payloads: ``{"document_id", "key"}`` ingests the object at ``key``;
``{"document_id", "delete": true}`` removes the document; ``{"document_id",
"backfill": true}`` fills the embeddings of a document finalized while the
embedding service was out (the worker enqueues those itself).

``chunk``
    Pins the object's version first (``stat``: the S3 ETag, a local file's size
    and mtime; other storages: a SHA-256 of the content) together with the
    database's time. A version that is already current writes nothing (the
    outcome says ``unchanged``). Otherwise it streams the object, ranged from the
    checkpointed byte offset on a retry, and writes chunks of that version in
    batches. Every read is pinned to the version: a retry first checks it, and
    the read itself refuses another one (``If-Match``). When the object changed,
    the chunks written from the old version are discarded and the document
    starts again from byte 0: two versions are never stitched together.
``embed``
    Fills the version's missing embeddings batch by batch (the table is the
    cursor), recording the model with each vector. With
    ``ingest.on_embedding_outage = "finalize_pending"`` an open circuit (every
    endpoint's) leaves the rest for the backfill instead of deferring the job.
``finalize``
    Verifies the version's chunks and switches the document to it in one
    transaction (``DocumentCatalog.finalize``), removing the old version's chunks.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from worker_core.errors import CircuitOpenError, PermanentError, TransientError
from worker_core.stages import StageContext
from worker_core.writes import Chunk

from .catalog import Outcome
from .chunker import ChunkCursor, TextChunk
from .storage import Storage, VersionChangedError, VersionedStorage

if TYPE_CHECKING:
    from .document_worker import DocumentWorker

__all__ = [
    "ChunkStage",
    "DocumentJob",
    "EmbedStage",
    "FinalizeStage",
    "Pin",
    "object_version",
    "parse_job",
]

#: Restarts after a changed object within one attempt before giving up on it.
MAX_RESTARTS = 3
_HASH_PREFIX = "sha256:"


@dataclass(frozen=True, slots=True)
class DocumentJob:
    """A validated DocumentWorker payload."""

    document_id: str
    key: str
    action: Literal["ingest", "delete", "backfill"]


def _text(ctx: StageContext, field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PermanentError(
            f"job {ctx.job.id}: payload field {field!r} must be a non-empty string", field=field
        )
    if "\x00" in value:
        raise PermanentError(f"job {ctx.job.id}: payload field {field!r} holds a NUL character")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise PermanentError(
            f"job {ctx.job.id}: payload field {field!r} is not valid Unicode", field=field
        ) from None
    return value


def parse_job(ctx: StageContext) -> DocumentJob:
    """The job's payload as a ``DocumentJob``; ``PermanentError`` naming the bad field."""
    payload = ctx.job.payload
    document_id = _text(ctx, "document_id", payload.get("document_id"))
    flags = []
    for flag in ("delete", "backfill"):
        value = payload.get(flag, False)
        if not isinstance(value, bool):
            raise PermanentError(f"job {ctx.job.id}: payload field {flag!r} must be true or false")
        if value:
            flags.append(flag)
    if len(flags) > 1:
        raise PermanentError(f"job {ctx.job.id}: a payload cannot both delete and backfill")
    if flags:
        key = payload.get("key")
        action: Literal["delete", "backfill"] = "delete" if flags[0] == "delete" else "backfill"
        return DocumentJob(document_id, "" if key is None else _text(ctx, "key", key), action)
    return DocumentJob(document_id, _text(ctx, "key", payload.get("key")), "ingest")


@dataclass(frozen=True, slots=True)
class Pin:
    """The version a job reads and when it was first read (database clock)."""

    version: str
    pinned_at: datetime

    def to_state(self) -> dict[str, str]:
        return {"version": self.version, "pinned_at": self.pinned_at.isoformat()}

    @classmethod
    def from_state(cls, state: Any) -> Pin | None:
        if not isinstance(state, dict) or "version" not in state:
            return None
        return cls(str(state["version"]), datetime.fromisoformat(str(state["pinned_at"])))


async def object_version(storage: Storage, key: str) -> str:
    """The object's version: ``stat`` of a ``VersionedStorage``, else a content hash."""
    if isinstance(storage, VersionedStorage):
        return (await storage.stat(key)).version
    digest = hashlib.sha256()
    async with aclosing(storage.open_stream(key)) as stream:
        async for piece in stream:
            digest.update(piece)
    return _HASH_PREFIX + digest.hexdigest()


async def _pinned_stream(
    storage: Storage, key: str, start: int, version: str
) -> AsyncGenerator[bytes, None]:
    """The object from ``start``, only as ``version``; ``VersionChangedError`` otherwise."""
    if isinstance(storage, VersionedStorage):
        if _takes_version(storage):
            async with aclosing(storage.open_stream(key, start=start, version=version)) as stream:
                async for piece in stream:
                    yield piece
            return
        # A subclass whose open_stream predates versions: check around the read.
        for check in (True, False):
            if (await storage.stat(key)).version != version:
                raise VersionChangedError(f"{key!r} changed since it was first read", key=key)
            if check:
                async with aclosing(storage.open_stream(key, start=start)) as stream:
                    async for piece in stream:
                        yield piece
        return
    # A content hash: a read from the top is checked when it ends; a resumed read
    # was checked by object_version() just before it.
    digest = hashlib.sha256() if start == 0 else None
    async with aclosing(storage.open_stream(key, start=start)) as stream:
        async for piece in stream:
            if digest is not None:
                digest.update(piece)
            yield piece
    if digest is not None and _HASH_PREFIX + digest.hexdigest() != version:
        raise VersionChangedError(f"{key!r} changed while it was read", key=key)


def _takes_version(storage: Storage) -> bool:
    try:
        parameters = inspect.signature(storage.open_stream).parameters
    except (TypeError, ValueError):
        return False
    return "version" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


class _Stage:
    def __init__(self, worker: DocumentWorker) -> None:
        self.worker = worker


class ChunkStage(_Stage):
    """Pin the version, then stream the document and write its chunks."""

    name = "chunk"

    async def run(self, ctx: StageContext) -> None:
        job = parse_job(ctx)
        if job.action == "delete":
            await self._delete(ctx, job)
            return
        if job.action == "backfill":
            await self._pin_current(ctx, job)
            return
        state = ctx.state
        pin = Pin.from_state(state.get("pin"))
        if pin is None:
            pin = await self._pin(ctx, job)
        elif not ChunkCursor.from_state(state.get("chunk_cursor")).done:
            # A retry: is it still the object the first attempt read?
            version = await object_version(self.worker.storage, job.key)
            if version != pin.version:
                pin = await self._restart(ctx, job, pin, version)
        while not ChunkCursor.from_state(state.get("chunk_cursor")).done:
            try:
                await self._chunk(ctx, job, pin)
            except VersionChangedError as exc:
                if state.get("restarts", 0) >= MAX_RESTARTS:
                    raise TransientError(
                        f"document {job.document_id!r} ({job.key}) changed {MAX_RESTARTS} "
                        "times while it was read; trying again later",
                        document_id=job.document_id,
                    ) from exc
                pin = await self._restart(ctx, job, pin, None)
        cursor = ChunkCursor.from_state(state["chunk_cursor"])
        state["chunk_count"] = cursor.index
        if state.get("outcome") == Outcome.UNCHANGED:
            ctx.logger.info(
                "document unchanged: nothing written", version=pin.version, chunks=cursor.index
            )
        else:
            ctx.logger.info("document chunked", chunks=cursor.index, **state["chunks"])

    async def _pin(self, ctx: StageContext, job: DocumentJob) -> Pin:
        version = await object_version(self.worker.storage, job.key)
        async with ctx.connection() as conn:
            pinned_at, record = await self.worker.catalog.pin(conn, job.document_id)
        pin = Pin(version, pinned_at)
        state = ctx.state
        state["pin"] = pin.to_state()
        state["chunks"] = {"written": 0, "skipped": 0}
        state.pop("chunk_cursor", None)
        if record is not None and record.version == version and not record.deleted:
            # The current version already: its chunks are stored and were verified.
            state["outcome"] = Outcome.UNCHANGED.value
            state["chunks"]["skipped"] = record.chunks
            state["chunk_cursor"] = ChunkCursor(record.chunks, 0, True).to_state()
        return pin

    async def _restart(
        self, ctx: StageContext, job: DocumentJob, old: Pin, found: str | None
    ) -> Pin:
        """The object changed: drop what the old version wrote and start at byte 0."""
        async with ctx.connection() as conn:
            discarded = await self.worker.catalog.discard(conn, job.document_id, old.version)
        ctx.state["restarts"] = ctx.state.get("restarts", 0) + 1
        ctx.state["discarded"] = ctx.state.get("discarded", 0) + discarded
        ctx.state.pop("outcome", None)
        pin = await self._pin(ctx, job)
        ctx.logger.warning(
            "document changed since its first read; restarting from byte 0",
            pinned=old.version,
            found=found or pin.version,
            discarded_chunks=discarded,
        )
        await ctx.checkpoint()
        return pin

    async def _chunk(self, ctx: StageContext, job: DocumentJob, pin: Pin) -> None:
        worker = self.worker
        state = ctx.state
        cursor = ChunkCursor.from_state(state.get("chunk_cursor"))
        if cursor.offset:
            ctx.logger.info("chunking resumes", offset=cursor.offset, index=cursor.index)
        name = f"document {job.document_id!r} ({job.key})"
        last_checkpoint = time.monotonic()
        batch: list[TextChunk] = []
        stream = _pinned_stream(worker.storage, job.key, cursor.offset, pin.version)
        async with (
            aclosing(stream),
            aclosing(worker.chunker.chunks(stream, cursor=cursor, name=name)) as chunks,
        ):
            async for piece in chunks:
                batch.append(piece)
                if len(batch) < worker.batch_size:
                    continue
                await self._write(ctx, job.document_id, pin.version, batch)
                batch = []
                if time.monotonic() - last_checkpoint >= worker.checkpoint_every:
                    await ctx.checkpoint()
                    last_checkpoint = time.monotonic()
        if batch:
            await self._write(ctx, job.document_id, pin.version, batch)
        cursor = ChunkCursor.from_state(state.get("chunk_cursor"))
        state["chunk_cursor"] = ChunkCursor(cursor.index, cursor.offset, True).to_state()

    async def _write(
        self, ctx: StageContext, document_id: str, version: str, batch: Sequence[TextChunk]
    ) -> None:
        rows = [
            Chunk(
                document_id,
                c.index,
                c.text,
                metadata={"start": c.start, "end": c.end},
                version=version,
            )
            for c in batch
        ]
        async with ctx.connection() as conn:
            result = await self.worker.writer.write(conn, rows)
        progress = ctx.state["chunks"]
        progress["written"] += result.inserted
        progress["skipped"] += result.skipped
        # Only now, with the batch stored, may the cursor move past it.
        ctx.state["chunk_cursor"] = batch[-1].cursor.to_state()

    async def _delete(self, ctx: StageContext, job: DocumentJob) -> None:
        async with ctx.connection() as conn:
            outcome, removed = await self.worker.catalog.delete(conn, job.document_id, job.key)
        ctx.state.setdefault("outcome", outcome.value)  # a repeat keeps the first answer
        ctx.state.setdefault("deleted_chunks", removed)
        self.worker.outcomes[outcome.value] += 1
        ctx.logger.info("document deleted", outcome=outcome.value, chunks=removed)

    async def _pin_current(self, ctx: StageContext, job: DocumentJob) -> None:
        async with ctx.connection() as conn:
            record = await self.worker.catalog.document(conn, job.document_id)
        if record is None or record.deleted or not record.embeddings_pending:
            ctx.state["skip"] = True
            ctx.logger.info("nothing to backfill", document_id=job.document_id)
            return
        ctx.state["pin"] = Pin(record.version, record.pinned_at).to_state()
        ctx.state["chunk_count"] = record.chunks


def _done(ctx: StageContext) -> bool:
    """Nothing left for embed and finalize: a delete or an empty backfill."""
    return bool(ctx.state.get("skip")) or parse_job(ctx).action == "delete"


class EmbedStage(_Stage):
    """Fill the missing embeddings of the pinned version, batch by batch."""

    name = "embed"

    async def run(self, ctx: StageContext) -> None:
        if _done(ctx):
            return
        job = parse_job(ctx)
        pin = Pin.from_state(ctx.state.get("pin"))
        if pin is None:
            raise PermanentError(
                f"job {ctx.job.id}: no pinned version; the chunk stage did not run"
            )
        worker = self.worker
        filled_total = 0
        after = -1
        try:
            while True:
                async with ctx.connection() as conn:
                    missing = await worker.writer.missing_embeddings(
                        conn,
                        job.document_id,
                        limit=worker.embed_batch_size,
                        after=after,
                        version=pin.version,
                        model=worker.embedding_model,
                    )
                if not missing:
                    break
                vectors = await worker.embedder.embed([m.content for m in missing])
                if len(vectors) != len(missing):
                    raise TransientError(
                        f"embedder returned {len(vectors)} vectors for {len(missing)} texts"
                    )
                async with ctx.connection() as conn:
                    filled_total += await worker.writer.set_embeddings(
                        conn,
                        zip((m.id for m in missing), vectors, strict=True),
                        model=worker.embedding_model,
                    )
                after = missing[-1].chunk_index
        except CircuitOpenError as exc:
            if job.action != "backfill" and not worker.finalize_pending:
                raise
            # Searchable by text now; the backfill fills the vectors once a breaker closes.
            ctx.state["embeddings_pending"] = True
            ctx.logger.warning(
                "embedding service unavailable: finalizing without embeddings",
                breaker=exc.breaker,
                filled=filled_total,
            )
        ctx.state["embedded"] = ctx.state.get("embedded", 0) + filled_total
        ctx.logger.info("document embedded", filled=filled_total)


class FinalizeStage(_Stage):
    """Verify the version's chunks and make it the document's current version."""

    name = "finalize"

    async def run(self, ctx: StageContext) -> None:
        if _done(ctx):
            return
        job = parse_job(ctx)
        pin = Pin.from_state(ctx.state.get("pin"))
        expected = ctx.state.get("chunk_count")
        if pin is None or not isinstance(expected, int):
            raise PermanentError(
                f"job {ctx.job.id}: no chunk count in the job state; the chunk stage did not run"
            )
        worker = self.worker
        async with ctx.connection() as conn:
            result = await worker.catalog.finalize(
                conn,
                document_id=job.document_id,
                storage_key=job.key,
                version=pin.version,
                pinned_at=pin.pinned_at,
                chunks=expected,
                job_id=ctx.job.id,
                model=worker.embedding_model,
                allow_pending=bool(ctx.state.get("embeddings_pending")),
            )
        outcome = result.outcome.value
        ctx.state.update(
            outcome=outcome,
            replaced=result.replaced,
            embeddings_pending=result.embeddings_pending,
            recorded=result.outcome in (Outcome.INGESTED, Outcome.REPLACED),
        )
        worker.outcomes[outcome] += 1
        if result.embeddings_pending and ctx.state["recorded"]:
            worker.outcomes["embeddings_pending"] += 1
        ctx.logger.info(
            f"document {outcome}",
            version=pin.version,
            chunks=expected,
            replaced=result.replaced,
            embeddings_pending=result.embeddings_pending,
        )
