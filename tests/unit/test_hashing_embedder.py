"""HashingEmbedder: reproducible everywhere, normalised, similar texts close."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker_core.ingest.embedders import Embedder, HashingEmbedder


def cosine(a: list[float], b: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b, strict=True))


def test_known_vector_never_changes() -> None:
    # Pinned: a change here changes every stored embedding of every user.
    vector = HashingEmbedder().embed_one("Hello, world!")
    third = 1 / math.sqrt(3)
    assert {i: v for i, v in enumerate(vector) if v} == {15: third, 336: -third, 381: -third}


def test_known_vector_with_char_ngrams() -> None:
    vector = HashingEmbedder(16, word_pairs=False, char_ngrams=3).embed_one("ab")
    # "<ab>" gives the n-grams "<ab" and "ab>", plus the word "ab" itself.
    assert sum(1 for v in vector if v) <= 3
    assert math.isclose(math.fsum(v * v for v in vector), 1.0)
    assert vector == HashingEmbedder(16, word_pairs=False, char_ngrams=3).embed_one("ab")


@settings(max_examples=200)
@given(st.text(max_size=300), st.sampled_from([1, 7, 384]))
def test_vectors_are_unit_length_and_repeatable(text: str, dims: int) -> None:
    embedder = HashingEmbedder(dims)
    vector = embedder.embed_one(text)
    assert len(vector) == dims
    assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-9)
    assert HashingEmbedder(dims).embed_one(text) == vector


def test_the_feature_cache_never_changes_results() -> None:
    texts = [f"word{i} other{i % 7} shared words here" for i in range(50)]
    small = HashingEmbedder(cache_size=5)
    big = HashingEmbedder()
    assert [small.embed_one(t) for t in texts] == [big.embed_one(t) for t in texts]


def test_similar_texts_are_closer_than_unrelated_ones() -> None:
    embedder = HashingEmbedder()
    a = embedder.embed_one("the cat sat on the mat by the door")
    b = embedder.embed_one("The cat sat on a mat by the door.")
    c = embedder.embed_one("quarterly revenue exceeded analyst expectations")
    assert cosine(a, b) > 0.6
    assert abs(cosine(a, c)) < 0.3


def test_only_ascii_case_is_folded() -> None:
    embedder = HashingEmbedder()
    assert embedder.embed_one("HELLO World") == embedder.embed_one("hello world")
    # Non-ASCII case mapping depends on the Unicode version: deliberately not folded.
    assert embedder.embed_one("Ärger") != embedder.embed_one("ärger")


def test_punctuation_and_spacing_do_not_matter() -> None:
    embedder = HashingEmbedder()
    assert embedder.embed_one("one, two;  three!") == embedder.embed_one("one two three")
    assert embedder.embed_one("données « chiffrées »") == embedder.embed_one("données chiffrées")


@pytest.mark.parametrize("text", ["", "   ", "!!!", "\udc80"])
def test_texts_without_words_still_get_a_unit_vector(text: str) -> None:
    vector = HashingEmbedder(8).embed_one(text)
    assert math.isclose(math.fsum(v * v for v in vector), 1.0)


def test_embed_keeps_order_and_satisfies_the_protocol() -> None:
    embedder = HashingEmbedder(32)
    assert isinstance(embedder, Embedder)
    texts = [f"text number {i}" for i in range(100)]
    vectors = asyncio.run(embedder.embed(texts))
    assert vectors == [embedder.embed_one(t) for t in texts]
    assert asyncio.run(embedder.embed([])) == []


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"dimensions": 0}, "dimensions"), ({"char_ngrams": -1}, "char_ngrams")]
)
def test_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HashingEmbedder(**kwargs)
