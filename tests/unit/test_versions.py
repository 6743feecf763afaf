"""Versioned chunk ids, the ingestion settings, and the small pure helpers of versions."""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from worker_core.config import WorkerConfig
from worker_core.ingest.catalog import dedupe_key, prefix_upper
from worker_core.ingest.embedders import HashingEmbedder
from worker_core.writes import Chunk, chunk_id

# Frozen like the unversioned ids: chunks written with a version carry these forever.
KNOWN = [
    ("doc-1", 0, '"5eb63bbbe01eeed093cb22bb8f5acdc3"', "610316a9-a5dd-5118-8b98-5fcf3925c301"),
    ("doc-1", 1, "11-1733557896000000000", "f048371f-0d96-5909-b576-4412d95397b1"),
    ("Ünïcødé 文档", 7, "sha256:ab", "7a44409f-92e8-567d-8b31-66bf8268fd32"),
    ("a:b", 0, "v:1", "babdf3f0-616c-5857-8663-8b5322651b5a"),
]

texts = st.text(min_size=1, max_size=30)
versions = st.none() | st.text(max_size=30)
indexes = st.integers(min_value=0, max_value=2**31 - 1)


@pytest.mark.parametrize(("document_id", "index", "version", "expected"), KNOWN)
def test_known_versioned_ids_never_change(
    document_id: str, index: int, version: str, expected: str
) -> None:
    assert chunk_id(document_id, index, version) == uuid.UUID(expected)
    assert Chunk(document_id, index, "text", version=version).id == uuid.UUID(expected)


def test_no_version_is_the_unversioned_id() -> None:
    assert chunk_id("doc-1", 0, None) == chunk_id("doc-1", 0, "") == chunk_id("doc-1", 0)
    assert chunk_id("doc-1", 0) == uuid.UUID("c025364a-f836-562e-8064-7a997ba775c8")
    assert Chunk("doc-1", 0, "x").id == chunk_id("doc-1", 0)


def test_versions_cannot_collide_with_ids_or_each_other() -> None:
    # Plain "<index>:<version>:<document_id>" would collide with unversioned names.
    assert chunk_id("b", 0, "a") != chunk_id("a:b", 0)
    assert chunk_id("c", 0, "a:b") != chunk_id("b:c", 0, "a")
    with pytest.raises(TypeError, match="version"):
        chunk_id("d", 0, 1)  # type: ignore[arg-type]


@given(texts, indexes, versions, texts, indexes, versions)
def test_distinct_inputs_give_distinct_ids(
    a: str, i: int, u: str | None, b: str, j: int, v: str | None
) -> None:
    if (a, i, u or None) != (b, j, v or None):
        assert chunk_id(a, i, u) != chunk_id(b, j, v)


def test_ingest_and_embedding_settings() -> None:
    config = WorkerConfig()
    assert config.ingest.on_embedding_outage == "defer"
    assert config.ingest.backfill_interval == 60.0
    assert config.embedding.fallback_endpoints == []
    config = WorkerConfig(
        ingest={"on_embedding_outage": "finalize_pending", "backfill_interval": 5},
        embedding={"provider": "http", "endpoint": "https://a.example/v1",
                   "fallback_endpoints": ["https://b.example/v1", "https://c.example/v1"]},
    )  # fmt: skip
    assert config.embedding.fallback_endpoints[1] == "https://c.example/v1"


@pytest.mark.parametrize(
    ("section", "value", "field"),
    [
        ("ingest", {"on_embedding_outage": "panic"}, "on_embedding_outage"),
        ("ingest", {"backfill_interval": 0}, "backfill_interval"),
        ("ingest", {"backfill_interval": math.inf}, "backfill_interval"),
        ("ingest", {"backfill_interval": math.nan}, "backfill_interval"),
        ("ingest", {"backfill_interval": 10**9}, "backfill_interval"),
        ("embedding", {"fallback_endpoints": ["ftp://x"]}, "embedding"),
        ("embedding", {"fallback_endpoints": "https://x"}, "fallback_endpoints"),
        ("embedding", {"fallback_endpoints": [f"https://{i}.x" for i in range(9)]}, "fallback"),
    ],
)
def test_bad_settings_name_the_field(section: str, value: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        WorkerConfig(**{section: value})  # type: ignore[arg-type]


def test_fallbacks_must_differ_and_use_https_in_production() -> None:
    with pytest.raises(ValidationError, match="must differ"):
        WorkerConfig(embedding={"endpoint": "https://a.x", "fallback_endpoints": ["https://a.x"]})
    with pytest.raises(ValidationError, match="fallback_endpoints must use https"):
        WorkerConfig(
            environment="production",
            database={"dsn": "postgresql://u:p@db/x"},
            embedding={"provider": "http", "endpoint": "https://a.x", "api_key": "sk-1",
                       "fallback_endpoints": ["http://b.example"]},
        )  # fmt: skip


def test_fallbacks_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CORE_EMBEDDING__FALLBACK_ENDPOINTS", '["https://b.x/v1"]')
    monkeypatch.setenv("WORKER_CORE_INGEST__ON_EMBEDDING_OUTAGE", "finalize_pending")
    config = WorkerConfig()
    assert config.embedding.fallback_endpoints == ["https://b.x/v1"]
    assert config.ingest.on_embedding_outage == "finalize_pending"


@given(st.text(max_size=8), st.text(max_size=8))
def test_prefix_upper_bounds_exactly_the_keys_with_the_prefix(prefix: str, key: str) -> None:
    upper = prefix_upper(prefix)
    inside = key >= prefix and (upper is None or key < upper)
    assert inside == key.startswith(prefix)


def test_prefix_upper_edges() -> None:
    assert prefix_upper("") is None
    assert prefix_upper("a/") == "a0"
    assert prefix_upper("a\U0010ffff") == "b"
    assert prefix_upper("\ud7ff") == "\ue000"


def test_dedupe_keys_are_readable_when_short_and_bounded_when_long() -> None:
    assert dedupe_key("ingest", "a.txt", '"etag"') == 'ingest:"etag":a.txt'
    assert dedupe_key("delete", "a.txt") == "delete:a.txt"
    long = dedupe_key("ingest", "k" * 5000, "v")
    assert long.startswith("ingest:sha256:") and len(long) < 100
    assert long != dedupe_key("ingest", "k" * 5000, "w")


def test_hashing_embedder_names_its_vector_space() -> None:
    assert HashingEmbedder(384).model == "worker-core-hashing-384-pairs"
    assert HashingEmbedder(16, word_pairs=False, char_ngrams=3).model == (
        "worker-core-hashing-16-ngrams3"
    )
