"""Embedders: the ``Embedder`` protocol and the dependency-free ``HashingEmbedder``.

``HashingEmbedder`` is feature hashing: each word, word pair and (optionally)
character n-gram of a text is hashed with BLAKE2b into one of ``dimensions``
buckets with a sign, and the counts are L2-normalised. It needs no model and no
network, and it is reproducible: the same text gives the same vector on every
machine and Python version, because nothing in it depends on the interpreter
(no salted ``hash()``, no Unicode database: case folding and token boundaries
use fixed ASCII rules, and the arithmetic is plain IEEE double precision in a
fixed order). Similar texts get similar vectors, which is enough for tests,
demos and lexical near-duplicate search; use a real model for semantics.

``HttpEmbedder`` (an OpenAI-compatible endpoint) lives in ``http_embedder.py``.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import math
import re
from typing import Protocol, runtime_checkable

__all__ = ["Embedder", "HashingEmbedder"]


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors of ``dimensions`` floats, one per text, in order.

    An embedder may also have a ``model`` string attribute naming its vector space;
    it is stored with every vector (``DocumentWorker`` falls back to the class name).
    """

    dimensions: int

    async def embed(self, texts: list[str]) -> list[list[float]]: ...


def _ascii_lower(text: str) -> str:
    """Only ASCII letters change case: str.lower() of other letters follows the
    running Python's Unicode database, which would make vectors depend on it."""
    if text.isascii():
        return text.lower()
    # bytes.lower() touches ASCII letters only.
    return text.encode("utf-8", "surrogatepass").lower().decode("utf-8", "surrogatepass")


# A token is a run of ASCII letters, digits and underscore, or of non-ASCII
# characters outside the fixed punctuation and space blocks (Latin-1 symbols,
# General Punctuation, CJK Symbols and Punctuation, fullwidth ASCII punctuation,
# specials). Fixed ranges, not \w, for the same reason as above.
_TOKEN = re.compile(
    "[0-9a-z_"
    "\u00c0-\u1fff"
    "\u2070-\u2dff"
    "\u2e80-\u2fff"
    "\u3040-\ufdff"
    "\ufe70-\ufefe"
    "\uff10-\uffef"
    "\U00010000-\U0010ffff]+"
)
_EMPTY_FEATURE = "\x00empty"
_YIELD_EVERY = 32  # texts embedded between two yields to the event loop


class HashingEmbedder:
    """Deterministic feature-hashing embeddings; no dependencies.

    Args:
        dimensions: the vector length (384 matches the common small models, so the
            pgvector column need not change when a real model replaces this one).
        word_pairs: also hash adjacent word pairs (some word order).
        char_ngrams: also hash character n-grams of this length inside each word
            (0 turns them off): robust to typos and inflections, slower.
        cache_size: hashed features remembered (words repeat a lot).
    """

    def __init__(
        self,
        dimensions: int = 384,
        *,
        word_pairs: bool = True,
        char_ngrams: int = 0,
        cache_size: int = 200_000,
    ) -> None:
        if dimensions < 1:
            raise ValueError("dimensions must be at least 1")
        if char_ngrams < 0:
            raise ValueError("char_ngrams must be 0 (off) or a length")
        self.dimensions = dimensions
        self.word_pairs = word_pairs
        self.char_ngrams = char_ngrams
        #: Names the vector space: each setting gives vectors of another one.
        self.model = (
            f"worker-core-hashing-{dimensions}"
            + ("-pairs" if word_pairs else "")
            + (f"-ngrams{char_ngrams}" if char_ngrams else "")
        )
        self._cache: dict[str, int] = {}
        self._cache_size = cache_size

    def __repr__(self) -> str:
        return (
            f"HashingEmbedder(dimensions={self.dimensions}, word_pairs={self.word_pairs}, "
            f"char_ngrams={self.char_ngrams})"
        )

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """One L2-normalised vector per text, in order."""
        out: list[list[float]] = []
        for i, text in enumerate(texts):
            if i and i % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # CPU-bound: let heartbeats and I/O through
            out.append(self.embed_one(text))
        return out

    def embed_one(self, text: str) -> list[float]:
        """The vector of one text (synchronous)."""
        tokens = _TOKEN.findall(_ascii_lower(text))
        features = list(tokens)
        if self.word_pairs:
            features.extend(f"{a} {b}" for a, b in itertools.pairwise(tokens))
        n = self.char_ngrams
        if n:
            for token in tokens:
                padded = f"<{token}>"
                features.extend(f"#{padded[i : i + n]}" for i in range(max(1, len(padded) - n + 1)))
        if not features:
            features.append(_EMPTY_FEATURE)
        # Integer counts per slot: exact arithmetic up to the one division, so the
        # result is the same on every IEEE 754 machine.
        slots: dict[int, int] = {}
        cache = self._cache
        for feature, count in collections.Counter(features).items():
            slot = cache.get(feature)
            if slot is None:
                slot = self._bucket(feature)
            # The sign halves collisions' bias: colliding features cancel on average.
            if slot < 0:
                slot, count = ~slot, -count
            slots[slot] = slots.get(slot, 0) + count
        vector = [0.0] * self.dimensions
        norm = math.sqrt(sum(c * c for c in slots.values()))
        if norm == 0.0:  # colliding features cancelled out: a fixed unit vector instead
            slot = self._bucket(_EMPTY_FEATURE)
            vector[slot if slot >= 0 else ~slot] = 1.0
            return vector
        for slot, count in slots.items():
            if count:
                vector[slot] = count / norm
        return vector

    def _bucket(self, feature: str) -> int:
        """The feature's slot, or ``~slot`` (negative) when it counts negatively."""
        slot = self._cache.get(feature)
        if slot is None:
            digest = hashlib.blake2b(
                feature.encode("utf-8", "surrogatepass"), digest_size=8
            ).digest()
            value = int.from_bytes(digest, "big")
            slot = value % self.dimensions
            if value >> 63:
                slot = ~slot
            if len(self._cache) >= self._cache_size:
                self._cache.clear()  # bounded memory; refilling is cheap
            self._cache[feature] = slot
        return slot
