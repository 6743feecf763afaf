"""ChunkWriter and TableWriter on a real PostgreSQL, with vector(n) and real[] columns."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from worker_core import Queue, WorkerConfig
from worker_core.errors import PayloadError, PermanentError
from worker_core.writes import SMALL_BATCH, Chunk, ChunkWriter, TableWriter, WriteResult

DIMS = 384


def vec(seed: int, dims: int = DIMS) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(-1, 1) for _ in range(dims)]


def chunks(document_id: str, indexes: range | list[int], *, embed: bool = True) -> list[Chunk]:
    return [
        Chunk(document_id, i, f"chunk {i} of {document_id}", vec(i) if embed else None, {"i": i})
        for i in indexes
    ]


@pytest.fixture(params=["vector", "real[]"])
async def store(request: pytest.FixtureRequest, config: WorkerConfig) -> AsyncIterator[Queue]:
    """A migrated schema whose embedding column is vector(384) or real[]."""
    async with Queue(config) as queue:
        await queue.migrate(vector=request.param == "vector")
        yield queue


async def rows(queue: Queue, document_id: str) -> list[tuple[Any, ...]]:
    async with queue.connection() as conn:
        cur = await conn.execute(
            sql.SQL(
                "SELECT id, chunk_index, content, embedding::real[], metadata "
                "FROM {}.chunks WHERE document_id = %s ORDER BY chunk_index"
            ).format(sql.Identifier(queue.schema)),
            (document_id,),
        )
        return await cur.fetchall()


async def test_embedding_column_is_detected(store: Queue) -> None:
    writer = ChunkWriter(store.schema)
    async with store.connection() as conn:
        column = await writer.embedding_column(conn)
        kind = (
            await (
                await conn.execute(
                    sql.SQL(
                        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                        "WHERE attrelid = %s::regclass AND attname = 'embedding'"
                    ),
                    (f'"{store.schema}".chunks',),
                )
            ).fetchone()
            or [""]
        )[0]
    if "vector" in kind:
        assert (column.kind, column.dimensions) == ("vector", DIMS)
    else:
        assert (column.kind, column.dimensions) == ("real[]", None)


@pytest.mark.parametrize("n", [1, SMALL_BATCH, SMALL_BATCH + 1, 300])
async def test_second_write_of_the_same_chunks_writes_nothing(store: Queue, n: int) -> None:
    writer = ChunkWriter(store.schema, dimensions=DIMS)
    batch = chunks("doc", range(n))
    async with store.connection() as conn:
        assert await writer.write(conn, batch) == WriteResult(n, 0)
        assert await writer.write(conn, batch) == WriteResult(0, n)
    stored = await rows(store, "doc")
    assert [r[0] for r in stored] == [c.id for c in batch]
    assert [r[1] for r in stored] == list(range(n))
    assert stored[0][2] == "chunk 0 of doc"
    assert stored[-1][3] == pytest.approx(vec(n - 1), rel=1e-6)  # float4 precision
    assert stored[-1][4] == {"i": n - 1}


@pytest.mark.parametrize("n", [10, 200])
async def test_partially_overlapping_batches(store: Queue, n: int) -> None:
    writer = ChunkWriter(store.schema)
    async with store.connection() as conn:
        assert await writer.write(conn, chunks("doc", range(n))) == WriteResult(n, 0)
        overlapping = chunks("doc", range(n // 2, n + n // 2))
        assert await writer.write(conn, overlapping) == WriteResult(n // 2, n - n // 2)
        # A chunk offered twice in one batch is written once.
        twice = chunks("other", [0, 1, 1, 2, 0])
        assert await writer.write(conn, twice) == WriteResult(3, 2)
        assert (await writer.counts(conn, "doc")).chunks == n + n // 2


async def test_rolled_back_transaction_leaves_nothing(store: Queue) -> None:
    writer = ChunkWriter(store.schema)
    async with store.connection() as conn:
        async with conn.transaction(force_rollback=True):
            assert await writer.write(conn, chunks("doc", range(5))) == WriteResult(5, 0)
            assert await writer.write(conn, chunks("doc", range(100))) == WriteResult(95, 5)
            assert (await writer.counts(conn, "doc")).chunks == 100
        assert (await writer.counts(conn, "doc")).chunks == 0


async def test_many_batches_in_one_committed_transaction(store: Queue) -> None:
    writer = ChunkWriter(store.schema)
    async with store.connection() as conn:
        async with conn.transaction():
            for start in range(0, 300, 100):
                assert (
                    await writer.write(conn, chunks("doc", range(start, start + 100)))
                ).inserted == 100
        assert (await writer.counts(conn, "doc")).chunks == 300


async def test_non_autocommit_connection_joins_the_callers_transaction(
    store: Queue, pg_dsn: str
) -> None:
    writer = ChunkWriter(store.schema)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        assert (await writer.write(conn, chunks("doc", range(40)))).inserted == 40
        await conn.rollback()
        assert (await writer.counts(conn, "doc")).chunks == 0


@pytest.mark.parametrize("n", [3, 100])
async def test_wrong_dimension_is_refused_naming_the_chunk(store: Queue, n: int) -> None:
    writer = ChunkWriter(store.schema, dimensions=DIMS)
    batch = chunks("doc", range(n))
    batch[2] = Chunk("doc", 2, "short", [0.5] * 7)
    async with store.connection() as conn:
        with pytest.raises(PermanentError, match=r"chunk 2 of document 'doc'.*7 dimensions.*384"):
            await writer.write(conn, batch)
        assert (await writer.counts(conn, "doc")).chunks == 0


async def test_real_array_without_dimensions_needs_a_consistent_batch(config: WorkerConfig) -> None:
    async with Queue(config) as queue:
        await queue.migrate(vector=False)
        writer = ChunkWriter(queue.schema)
        async with queue.connection() as conn:
            assert (await writer.embedding_column(conn)).kind == "real[]"
            batch = [Chunk("d", 0, "a", [1.0, 2.0]), Chunk("d", 1, "b", [1.0, 2.0, 3.0])]
            with pytest.raises(PermanentError, match=r"chunk 1 of document 'd'.*3 dimensions"):
                await writer.write(conn, batch)


async def test_writer_dimensions_must_match_a_vector_column(queue: Queue) -> None:
    writer = ChunkWriter(queue.schema, dimensions=768)
    async with queue.connection() as conn:
        if (await ChunkWriter(queue.schema).embedding_column(conn)).kind != "vector":
            pytest.skip("pgvector is not available on this server")
        with pytest.raises(ValueError, match=r"vector\(384\).*768"):
            await writer.write(conn, chunks("doc", range(1)))


@pytest.mark.parametrize("n", [1, 100])
async def test_nul_in_content_is_a_permanent_error(queue: Queue, n: int) -> None:
    writer = ChunkWriter(queue.schema)
    batch = chunks("doc", range(n))
    batch[-1] = Chunk("doc", n - 1, "text\x00more")
    async with queue.connection() as conn:
        with pytest.raises(PermanentError, match=f"chunk {n - 1} of document 'doc'.*NUL"):
            await writer.write(conn, batch)
        assert (await writer.counts(conn, "doc")).chunks == 0


async def test_lone_surrogate_and_bad_metadata_are_permanent(queue: Queue) -> None:
    writer = ChunkWriter(queue.schema)
    async with queue.connection() as conn:
        with pytest.raises(PermanentError, match=r"chunk 0 of document 'doc'.*not valid Unicode"):
            await writer.write(conn, [Chunk("doc", 0, "bad \udc80 text")])
        with pytest.raises(PayloadError, match="metadata of chunk 1"):
            await writer.write(conn, [Chunk("doc", 1, "x", metadata={"k": object()})])


@pytest.mark.parametrize("n", [5, 100])
async def test_embed_helpers_fill_only_missing_embeddings(store: Queue, n: int) -> None:
    writer = ChunkWriter(store.schema, dimensions=DIMS)
    async with store.connection() as conn:
        await writer.write(conn, chunks("doc", range(n), embed=False))
        assert await writer.counts(conn, "doc") == (n, 0, n)
        first = await writer.missing_embeddings(conn, "doc", limit=3)
        assert [m.chunk_index for m in first] == [0, 1, 2]
        assert first[0].content == "chunk 0 of doc"
        assert await writer.set_embeddings(conn, [(m.id, vec(m.chunk_index)) for m in first]) == 3
        # A replay, even with other vectors, changes nothing.
        assert await writer.set_embeddings(conn, [(m.id, vec(99)) for m in first]) == 0
        rest = await writer.missing_embeddings(conn, "doc", limit=n)
        assert [m.chunk_index for m in rest] == list(range(3, n))
        assert (
            await writer.set_embeddings(conn, [(m.id, vec(m.chunk_index)) for m in rest]) == n - 3
        )
        assert await writer.counts(conn, "doc") == (n, n, n)
        assert await writer.missing_embeddings(conn, "doc") == []
        with pytest.raises(PermanentError, match=f"chunk {first[0].id}.*2 dimensions"):
            await writer.set_embeddings(conn, [(first[0].id, [1.0, 2.0])])
    stored = await rows(store, "doc")
    assert stored[0][3] == pytest.approx(vec(0), rel=1e-6)


async def test_overlapping_concurrent_writers_do_not_deadlock(queue: Queue) -> None:
    writer = ChunkWriter(queue.schema)
    batch = chunks("doc", range(200))

    async def write(order: list[Chunk]) -> WriteResult:
        async with queue.connection() as conn, conn.transaction():
            return await writer.write(conn, order)

    results = await asyncio.gather(*(write(batch[::step]) for step in (1, -1, 1, -1)))
    assert sum(r.inserted for r in results) == 200
    assert all(r.offered == 200 for r in results)


@pytest.mark.parametrize("n", [4, 120])
async def test_table_writer_targets_any_table_with_a_unique_key(queue: Queue, n: int) -> None:
    table = sql.Identifier(queue.schema, "entities")
    async with queue.connection() as conn:
        await conn.execute(
            sql.SQL(
                "CREATE TABLE {} (tenant text, key int, body jsonb NOT NULL, tags text[], "
                "seen timestamptz NOT NULL DEFAULT now(), UNIQUE (tenant, key))"
            ).format(table)
        )
        writer = TableWriter(
            "entities",
            ["tenant", "key", "body", "tags"],
            schema=queue.schema,
            conflict=["tenant", "key"],
        )
        batch = [("acme", i, {"n": i}, ["a", "b"]) for i in range(n)]
        assert await writer.write(conn, batch) == WriteResult(n, 0)
        assert await writer.write(conn, [*batch, ("other", 0, {}, None)]) == WriteResult(1, n)
        cur = await conn.execute(sql.SQL("SELECT body, tags FROM {} WHERE key = 1").format(table))
        assert await cur.fetchone() == ({"n": 1}, ["a", "b"])
        with pytest.raises(ValueError, match="row 0 has 2 values"):
            await writer.write(conn, [("x", 1)])
    with pytest.raises(ValueError, match="no column"):
        async with queue.connection() as conn:
            await TableWriter("entities", ["nope"], schema=queue.schema).write(conn, [(1,)])


async def test_missing_table_says_to_migrate(config: WorkerConfig) -> None:
    async with Queue(config) as queue, queue.connection() as conn:
        with pytest.raises(RuntimeError, match="migrate"):
            await ChunkWriter(queue.schema).write(conn, chunks("doc", range(1)))


async def test_direct_copy_gives_way_to_staging_on_conflicts_and_back(queue: Queue) -> None:
    writer = ChunkWriter(queue.schema)
    table = writer._chunks

    def optimistic() -> bool:  # read anew each time (an inline attribute would narrow)
        return table._optimistic

    async with queue.connection() as conn:
        assert await writer.write(conn, chunks("doc", range(100))) == WriteResult(100, 0)
        assert optimistic()  # all new: copied straight in
        assert await writer.write(conn, chunks("doc", range(50, 150))) == WriteResult(50, 50)
        assert not optimistic()  # a conflict: the next batch is staged
        assert await writer.write(conn, chunks("doc", range(50, 150))) == WriteResult(0, 100)
        assert not optimistic()
        assert await writer.write(conn, chunks("doc", range(150, 250))) == WriteResult(100, 0)
        assert optimistic()  # a whole batch went in: back to direct copies
        assert await writer.write(conn, chunks("doc", range(250, 350))) == WriteResult(100, 0)
        assert (await writer.counts(conn, "doc")) == (350, 350, 350)
        # A failed direct copy inside the caller's transaction leaves it usable.
        async with conn.transaction():
            assert await writer.write(conn, chunks("doc", range(300, 400))) == WriteResult(50, 50)
            assert (await writer.counts(conn, "doc")).chunks == 400


@pytest.mark.parametrize("n", [2, SMALL_BATCH + 8])
async def test_both_paths_enforce_column_types_alike(queue: Queue, n: int) -> None:
    table = sql.Identifier(queue.schema, "codes")
    async with queue.connection() as conn:
        await conn.execute(sql.SQL("CREATE TABLE {} (code varchar(3) PRIMARY KEY)").format(table))
        writer = TableWriter("codes", ["code"], schema=queue.schema)
        # Never silently truncated, whichever path the batch takes.
        with pytest.raises(psycopg.errors.StringDataRightTruncation):
            await writer.write(conn, [(f"{i:03d}",) for i in range(n - 1)] + [("toolong",)])
        assert await writer.write(conn, [(f"{i:03d}",) for i in range(n)]) == WriteResult(n, 0)
