"""Idempotent writes: deterministic chunk ids and the chunk buffer writer.

A stage that may run twice (a retry, a rescue after a crash) must not write twice.
Every row therefore carries a key derived from its content's identity
(``chunk_id(document_id, index)``), and rows are written with ``ON CONFLICT DO
NOTHING`` in the caller's transaction. The result counts what was really written
and what already existed, so a stage validates its progress instead of assuming it.

``ChunkWriter`` targets ``<schema>.chunks`` and packs embeddings in the wire format
of its embedding column (pgvector ``vector(n)`` or ``real[]``, read from the
catalog). The bulk machinery it runs on, and ``TableWriter`` for any other table
with a unique key (the extension point for users' own buffer tables), live in
``bulk.py`` and are re-exported here.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from psycopg import AsyncConnection

from .bulk import (
    FLOAT4_ARRAY_OID,
    SMALL_BATCH,
    TableWriter,
    WriteResult,
    jsonb_binary,
    pack_float4_array,
    pack_vector,
)
from .errors import PermanentError
from .jobs import dump_json
from .sql import load_queries, render

__all__ = [
    "CHUNK_NAMESPACE",
    "SMALL_BATCH",
    "Chunk",
    "ChunkWriter",
    "DocumentCounts",
    "EmbeddingColumn",
    "MissingEmbedding",
    "TableWriter",
    "WriteResult",
    "chunk_id",
    "pack_float4_array",
    "pack_vector",
]

#: The namespace of every chunk id. FROZEN FOREVER: changing it changes every id
#: ever written, so re-ingesting a document would duplicate all of its chunks.
CHUNK_NAMESPACE = uuid.UUID("179659da-39c9-51cb-afb3-f0beb266779e")

_MAX_INDEX = 2**31 - 1  # chunk_index is an integer column


def chunk_id(document_id: str, index: int, version: str | None = None) -> uuid.UUID:
    """The id of chunk ``index`` of ``document_id``: the same on every machine, forever.

    A UUIDv5 in ``CHUNK_NAMESPACE``. Without a version (``None`` or ``""``) the name
    is ``"<index>:<document_id>"``, as it always was; the decimal index cannot
    contain ``:``, so no two (document, index) pairs share a name. With one it is
    ``"v<len(version)>:<version>:<index>:<document_id>"``: the leading ``v`` keeps
    it apart from every unversioned name (those start with a digit) and the length
    prefix keeps a ``:`` inside the version from moving the boundaries.

    Raises:
        TypeError: ``document_id`` or ``version`` is not a str, or ``index`` not an int.
        ValueError: ``index`` is negative or too large, or ``document_id`` is empty.
    """
    if not isinstance(document_id, str):
        raise TypeError(f"document_id must be a str, not {type(document_id).__name__}")
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"chunk index must be an int, not {type(index).__name__}")
    if version is not None and not isinstance(version, str):
        raise TypeError(f"version must be a str or None, not {type(version).__name__}")
    if not document_id:
        raise ValueError("document_id must not be empty")
    if not 0 <= index <= _MAX_INDEX:
        raise ValueError(f"chunk index {index} is outside 0..{_MAX_INDEX}")
    if not version:
        return uuid.uuid5(CHUNK_NAMESPACE, f"{index}:{document_id}")
    return uuid.uuid5(CHUNK_NAMESPACE, f"v{len(version)}:{version}:{index}:{document_id}")


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of a document; ``id`` is ``chunk_id(document_id, index, version)``.

    ``version`` names the version of the document the chunk was cut from (``None``:
    unversioned, stored as ``''``).
    """

    document_id: str
    index: int
    content: str
    embedding: Sequence[float] | None = None
    metadata: Mapping[str, Any] | None = None
    version: str | None = None
    id: uuid.UUID = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", chunk_id(self.document_id, self.index, self.version))

    @property
    def label(self) -> str:
        """How errors name this chunk."""
        return f"chunk {self.index} of document {self.document_id!r}"


class MissingEmbedding(NamedTuple):
    """A stored chunk whose embedding is still NULL."""

    id: uuid.UUID
    chunk_index: int
    content: str


class DocumentCounts(NamedTuple):
    """What the buffer table holds for one document."""

    chunks: int
    embedded: int
    next_index: int


@dataclass(frozen=True)
class EmbeddingColumn:
    """The embedding column as migrate() created it: ``vector(n)`` or ``real[]``."""

    kind: str  # "vector" or "real[]"
    dimensions: int | None  # None: real[] with no fixed length known to the writer


# -- the chunk buffer writer ----------------------------------------------------------
_CHUNK_COLUMNS = (
    "id",
    "document_id",
    "version",
    "chunk_index",
    "content",
    "embedding",
    "embedding_model",
    "metadata",
)
_Packer = Callable[[Sequence[float], str], bytes]


class ChunkWriter:
    """Writes chunks to ``<schema>.chunks`` idempotently; owns no connection.

    The embedding column's type and dimension are read from the catalog once per
    connection; embeddings of another length are refused before any SQL runs,
    naming the chunk.

    Args:
        schema: the worker_core schema (``database.schema``).
        dimensions: the embedding length to enforce. ``vector(n)`` columns carry
            their own and must agree; ``real[]`` columns have none, so without it
            the embeddings of one batch only have to agree with each other.
        optimistic: see ``TableWriter``.
    """

    def __init__(
        self, schema: str = "worker_core", *, dimensions: int | None = None, optimistic: bool = True
    ) -> None:
        if dimensions is not None and dimensions < 1:
            raise ValueError("dimensions must be at least 1")
        self.schema = schema
        self.dimensions = dimensions
        self._chunks = TableWriter(
            "chunks",
            _CHUNK_COLUMNS,
            schema=schema,
            order_by=("id",),
            packed=("embedding", "metadata"),
            optimistic=optimistic,
        )
        self._embeds = TableWriter(
            "chunks", ("id", "embedding", "embedding_model"), schema=schema, packed=("embedding",)
        )
        self._columns: weakref.WeakKeyDictionary[
            AsyncConnection[Any], tuple[EmbeddingColumn, _Packer]
        ] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"ChunkWriter(schema={self.schema!r}, dimensions={self.dimensions})"

    async def embedding_column(self, conn: AsyncConnection[Any]) -> EmbeddingColumn:
        """The embedding column's kind and dimension (read once per connection)."""
        return (await self._column(conn))[0]

    async def _column(self, conn: AsyncConnection[Any]) -> tuple[EmbeddingColumn, _Packer]:
        found = self._columns.get(conn)
        if found is not None:
            return found
        col = await self._chunks.column(conn, "embedding")
        if col.type_name == "vector":
            dims = col.typmod if col.typmod > 0 else None
            if self.dimensions is not None and dims is not None and dims != self.dimensions:
                raise ValueError(
                    f"{self.schema}.chunks stores vector({dims}) but this writer expects "
                    f"{self.dimensions} dimensions; embedding.dimensions must match the "
                    "value the schema was migrated with"
                )
            found = (EmbeddingColumn("vector", dims or self.dimensions), pack_vector)
        elif col.oid == FLOAT4_ARRAY_OID:
            found = (EmbeddingColumn("real[]", self.dimensions), pack_float4_array)
        else:
            raise RuntimeError(
                f"{self.schema}.chunks.embedding has type {col.sql_type}; "
                "expected vector(n) or real[]"
            )
        self._columns[conn] = found
        return found

    @staticmethod
    def _check_length(column: EmbeddingColumn, n: int, label: str, first: list[int]) -> None:
        expected = column.dimensions if column.dimensions is not None else (first or [n])[0]
        if n != expected:
            raise PermanentError(
                f"{label}: embedding has {n} dimensions, the chunks table takes {expected}",
                dimensions=n,
                expected=expected,
            )
        if not first:
            first.append(n)

    async def write(
        self, conn: AsyncConnection[Any], chunks: Iterable[Chunk], *, model: str | None = None
    ) -> WriteResult:
        """Insert ``chunks`` with ON CONFLICT DO NOTHING in the caller's transaction.

        ``model`` is recorded with the embeddings the chunks carry.

        Raises:
            PermanentError: a chunk's content holds a NUL character (PostgreSQL text
                cannot), its metadata is not JSON, or its embedding has the wrong
                dimension or a non-finite value; the message names the chunk.
        """
        batch = chunks if isinstance(chunks, list) else list(chunks)
        if not batch:
            return WriteResult(0, 0)
        column, pack = await self._column(conn)
        first: list[int] = []
        rows: list[tuple[Any, ...]] = []
        for chunk in batch:
            if "\x00" in chunk.content:
                raise PermanentError(
                    f"{chunk.label}: content holds a NUL character, which PostgreSQL text "
                    "cannot store (binary content?)",
                    document_id=chunk.document_id,
                    chunk_index=chunk.index,
                )
            embedding = None
            if chunk.embedding is not None:
                self._check_length(column, len(chunk.embedding), chunk.label, first)
                embedding = pack(chunk.embedding, chunk.label)
            metadata = (
                jsonb_binary(dump_json(dict(chunk.metadata), f"metadata of {chunk.label}"))
                if chunk.metadata
                else _EMPTY_JSONB
            )
            rows.append(
                (
                    chunk.id,
                    chunk.document_id,
                    chunk.version or "",
                    chunk.index,
                    chunk.content,
                    embedding,
                    model if embedding is not None else None,
                    metadata,
                )
            )
        try:
            return await self._chunks.write(conn, rows)
        except UnicodeEncodeError as exc:
            raise _unencodable(batch) or exc from exc

    async def missing_embeddings(
        self,
        conn: AsyncConnection[Any],
        document_id: str,
        limit: int = 256,
        *,
        after: int = -1,
        version: str | None = None,
        model: str | None = None,
    ) -> list[MissingEmbedding]:
        """Up to ``limit`` chunks of one version of ``document_id`` that need an
        embedding, by index.

        ``after``: only chunks with a higher index (pass the last index of the
        previous batch to page through a large document cheaply). ``version``:
        ``None`` means the unversioned chunks. ``model``: also chunks embedded by
        another model (their vectors must not be mixed with this model's).
        """
        cur = await conn.execute(
            render(_QUERIES["missing_embeddings"], self.schema),
            {
                "document_id": document_id,
                "limit": limit,
                "after": after,
                "version": version or "",
                "model": model,
            },
        )
        return [MissingEmbedding(*row) for row in await cur.fetchall()]

    async def set_embeddings(
        self,
        conn: AsyncConnection[Any],
        embeddings: Iterable[tuple[uuid.UUID, Sequence[float]]],
        *,
        model: str | None = None,
    ) -> int:
        """Store embeddings of chunks that have none; returns how many were filled.

        A chunk that already has an embedding keeps it, so a replayed batch is a
        no-op; unless ``model`` is given and the stored vector was made by another
        (recorded) model, which it replaces. ``model`` is recorded with each vector.

        Raises:
            PermanentError: an embedding of the wrong dimension or with a
                non-finite value (the message names the chunk id).
        """
        pairs = list(embeddings)
        if not pairs:
            return 0
        column, pack = await self._column(conn)
        first: list[int] = []
        rows = []
        for chunk, vector in pairs:
            label = f"chunk {chunk}"
            self._check_length(column, len(vector), label, first)
            rows.append((chunk, pack(vector, label), model))
        return await self._embeds.apply(conn, rows, "set_embeddings_from_stage")

    async def counts(
        self,
        conn: AsyncConnection[Any],
        document_id: str,
        *,
        version: str | None = None,
        model: str | None = None,
    ) -> DocumentCounts:
        """How many chunks of one version of ``document_id`` are stored and embedded
        (by ``model``, when given; vectors with no recorded model count too)."""
        cur = await conn.execute(
            render(_QUERIES["document_counts"], self.schema),
            {"document_id": document_id, "version": version or "", "model": model},
        )
        row = await cur.fetchone()
        return DocumentCounts(*row) if row else DocumentCounts(0, 0, 0)


_EMPTY_JSONB = jsonb_binary("{}")


def _unencodable(batch: Sequence[Chunk]) -> PermanentError | None:
    """Name the chunk whose text holds a lone surrogate (which UTF-8 cannot carry)."""
    for chunk in batch:
        for text in (chunk.content, chunk.document_id):
            try:
                text.encode()
            except UnicodeEncodeError as exc:
                return PermanentError(
                    f"{chunk.label}: text is not valid Unicode ({exc.reason} at {exc.start})",
                    document_id=chunk.document_id,
                    chunk_index=chunk.index,
                )
    return None


_QUERIES = load_queries("writes.sql")
