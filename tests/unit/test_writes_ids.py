"""chunk_id and Chunk: ids frozen forever, collision-free naming, wire packing."""

from __future__ import annotations

import math
import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker_core.errors import PermanentError
from worker_core.sql import load_queries, render
from worker_core.writes import (
    CHUNK_NAMESPACE,
    Chunk,
    WriteResult,
    chunk_id,
    pack_float4_array,
    pack_vector,
)

# These values are part of the public contract: every chunk ever written has an
# id computed this way. If this test fails, the namespace or the name encoding
# changed, and re-ingesting any existing document would duplicate its chunks.
KNOWN = [
    ("doc-1", 0, "c025364a-f836-562e-8064-7a997ba775c8"),
    ("doc-1", 1, "b247ef65-f436-55b6-8bda-cbe7eb0bf6e2"),
    ("s3://bucket/reports/2024.txt", 41, "f211b672-0dc6-5357-8f1c-98f530cb34c7"),
    ("Ünïcødé 文档", 7, "eeb0e512-208d-5f2e-ae00-1857fdcdf29a"),
    ("a:b", 0, "25b98c19-d896-5567-b9a5-83597095fcb4"),
    ("0:a", 1, "e4609538-8f36-57ce-973c-25277beddade"),
]

document_ids = st.text(min_size=1, max_size=40)  # hypothesis never draws lone surrogates
indexes = st.integers(min_value=0, max_value=2**31 - 1)


def test_namespace_is_frozen() -> None:
    assert uuid.UUID("179659da-39c9-51cb-afb3-f0beb266779e") == CHUNK_NAMESPACE


@pytest.mark.parametrize(("document_id", "index", "expected"), KNOWN)
def test_known_ids_never_change(document_id: str, index: int, expected: str) -> None:
    assert chunk_id(document_id, index) == uuid.UUID(expected)
    assert Chunk(document_id, index, "text").id == uuid.UUID(expected)


@given(document_ids, indexes)
def test_chunk_id_is_a_uuid5_and_deterministic(document_id: str, index: int) -> None:
    first = chunk_id(document_id, index)
    assert first.version == 5
    assert chunk_id(document_id, index) == first
    assert Chunk(document_id, index, "").id == first


@given(document_ids, indexes, document_ids, indexes)
def test_distinct_inputs_give_distinct_ids(a: str, i: int, b: str, j: int) -> None:
    if (a, i) != (b, j):
        assert chunk_id(a, i) != chunk_id(b, j)


def test_separator_in_document_ids_cannot_collide() -> None:
    # Plain concatenation would give "a12" twice here; "<index>:<document_id>" cannot.
    assert chunk_id("a1", 2) != chunk_id("a", 12)
    assert chunk_id("1:a", 0) != chunk_id("a", 1)
    assert len({chunk_id(d, i) for d in ("a", "0:a", "1:a", "a:0") for i in range(3)}) == 12


@pytest.mark.parametrize(
    ("document_id", "index", "error"),
    [
        ("", 0, ValueError),
        ("d", -1, ValueError),
        ("d", 2**31, ValueError),
        ("d", True, TypeError),
        (1, 0, TypeError),
        ("d", 1.0, TypeError),
    ],
)
def test_bad_inputs_are_refused(document_id: object, index: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        chunk_id(document_id, index)  # type: ignore[arg-type]


def test_chunk_equality_ignores_nothing_but_id_field() -> None:
    a = Chunk("d", 1, "x", [1.0], {"k": 1})
    assert a == Chunk("d", 1, "x", [1.0], {"k": 1})
    assert a != Chunk("d", 1, "y")
    assert a.label == "chunk 1 of document 'd'"


def test_write_result_adds_up() -> None:
    total = WriteResult(3, 1) + WriteResult(0, 4)
    assert total == WriteResult(3, 5)
    assert total.offered == 8


@given(
    st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=64)
)
def test_vector_packing_round_trips(values: list[float]) -> None:
    packed = pack_vector(values)
    dims, unused = struct.unpack_from(">HH", packed)
    assert (dims, unused) == (len(values), 0)
    assert list(struct.unpack_from(f">{dims}f", packed, 4)) == values


@given(
    st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=64)
)
def test_float4_array_packing_round_trips(values: list[float]) -> None:
    packed = pack_float4_array(values)
    ndim, flags, oid, n, lower = struct.unpack_from(">iiIii", packed)
    assert (ndim, flags, oid, n, lower) == (1, 0, 700, len(values), 1)
    body = struct.unpack_from(">" + "if" * n, packed, 20)
    assert list(body[0::2]) == [4] * n
    assert list(body[1::2]) == values


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e300])
def test_non_finite_embedding_values_are_refused(bad: float) -> None:
    with pytest.raises(PermanentError, match="embedding value 1"):
        pack_vector([0.0, bad, 1.0], "chunk 3 of document 'd'")


def test_non_numeric_embedding_is_refused() -> None:
    with pytest.raises(PermanentError, match="sequence of numbers"):
        pack_vector(["a"], "chunk 0")  # type: ignore[list-item]


def test_every_write_query_renders() -> None:
    from psycopg import sql

    parts = {
        k: sql.SQL("x")
        for k in ("table", "stage", "source", "columns", "names", "conflict", "order")
    }
    for name, text in load_queries("writes.sql").items():
        rendered = render(text, "s", **parts).as_string(None)
        assert "{" not in rendered.replace("'{}'", ""), name
