"""The streaming chunker: stream splits never matter, resume gives the same tail, bad input."""

from __future__ import annotations

import asyncio
import itertools
import tracemalloc
from collections.abc import AsyncIterator, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker_core.errors import PermanentError
from worker_core.ingest.chunker import ChunkCursor, Chunker, TextChunk

# Words, several kinds of whitespace and multi-byte characters (2, 3 and 4 bytes).
alphabet = st.sampled_from(list("ab cd\n\t.é€𝄞x  y\n\n"))
texts = st.text(alphabet, min_size=0, max_size=600)
configs = st.tuples(st.integers(2, 60), st.integers(0, 59)).filter(lambda c: c[1] < c[0])


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given (sorted, deduplicated) positions."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


async def aiter_of(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def collect(
    chunker: Chunker, parts: Iterable[bytes], cursor: ChunkCursor | None = None
) -> list[TextChunk]:
    async def run() -> list[TextChunk]:
        return [c async for c in chunker.chunks(aiter_of(parts), cursor=cursor, name="doc")]

    return asyncio.run(run())


def has_text(text: str) -> bool:
    return bool(text.strip(" \t\n\r\f\v"))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(texts, configs, st.lists(st.integers(0, 10_000), max_size=30))
def test_any_stream_split_gives_the_chunks_of_the_whole(
    text: str, config: tuple[int, int], cuts: list[int]
) -> None:
    chunker = Chunker(*config)
    data = text.encode()
    if not has_text(text):
        with pytest.raises(PermanentError, match="empty document"):
            collect(chunker, pieces(data, cuts))
        return
    whole = chunker.split(text)
    assert collect(chunker, pieces(data, cuts)) == whole
    assert collect(chunker, [data]) == whole


@settings(max_examples=150)
@given(texts.filter(has_text), configs)
def test_chunks_are_spans_of_the_document(text: str, config: tuple[int, int]) -> None:
    size, overlap = config
    data = text.encode()
    chunks = Chunker(size, overlap).split(text)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    # The last chunk's cursor is done unless only whitespace followed it.
    assert chunks[-1].cursor.done or not has_text(data[chunks[-1].cursor.offset :].decode())
    assert not any(c.cursor.done for c in chunks[:-1])
    for chunk in chunks:
        assert 0 < len(chunk.text) <= size
        assert data[chunk.start : chunk.end].decode() == chunk.text
        assert has_text(chunk.text)
    for prev, nxt in itertools.pairwise(chunks):
        assert prev.start < nxt.start
        assert prev.cursor.offset <= nxt.start
        # What lies between two chunks (beyond the overlap) is whitespace only.
        if nxt.start > prev.end:
            assert not has_text(data[prev.end : nxt.start].decode())
        else:
            assert (
                prev.end - nxt.start <= len(prev.text[-overlap:].encode())
                if overlap
                else prev.end == nxt.start
            )
    assert not has_text(data[: chunks[0].start].decode())
    assert not has_text(data[chunks[-1].end :].decode())


@settings(max_examples=100)
@given(
    texts.filter(has_text),
    configs,
    st.integers(0, 1000),
    st.lists(st.integers(0, 10_000), max_size=10),
)
def test_resume_from_any_cursor_gives_the_same_tail(
    text: str, config: tuple[int, int], pick: int, cuts: list[int]
) -> None:
    chunker = Chunker(*config)
    data = text.encode()
    whole = chunker.split(text)
    k = pick % len(whole)
    cursor = whole[k].cursor
    tail = collect(chunker, pieces(data[cursor.offset :], cuts), cursor=cursor)
    assert tail == whole[k + 1 :]
    if whole[-1].cursor.done:
        assert collect(chunker, [b"never read"], cursor=whole[-1].cursor) == []


def test_cursor_round_trips_through_state() -> None:
    cursor = ChunkCursor(7, 1234, True)
    assert ChunkCursor.from_state(cursor.to_state()) == cursor
    assert ChunkCursor.from_state(None) == ChunkCursor()
    assert ChunkCursor.from_state({}) == ChunkCursor(0, 0, False)


def test_breaks_prefer_paragraphs_then_lines_then_words() -> None:
    text = "alpha beta gamma.\n\ndelta epsilon zeta eta theta iota kappa"
    first = Chunker(30, 0).split(text)[0]
    assert first.text == "alpha beta gamma.\n\n"
    assert Chunker(12, 0).split("aaaaaaaaaaaaaaaaaaaaaaaaa")[0].text == "a" * 12  # hard cut


def test_overlap_starts_at_a_word() -> None:
    chunks = Chunker(20, 8).split("one two three four five six seven eight nine ten")
    assert chunks[0].text == "one two three four "
    assert chunks[1].text.startswith("four ")


def test_byte_order_mark_is_skipped_with_true_offsets() -> None:
    data = "\ufeffhello world".encode()
    [chunk] = collect(Chunker(100, 10), [data[:2], data[2:]])
    assert chunk.text == "hello world"
    assert (chunk.start, chunk.end) == (3, len(data))


@pytest.mark.parametrize("split_at", [1, 2, 3, 4, 5, 6, 7, 100])
def test_invalid_utf8_names_the_byte_offset(split_at: int) -> None:
    data = "héllo".encode() + b"\xff" + b"world"  # the bad byte is at offset 6
    with pytest.raises(PermanentError, match=r"not valid UTF-8.*byte offset 6") as err:
        collect(Chunker(10, 2), pieces(data, [split_at]))
    assert err.value.detail["offset"] == 6


def test_truncated_character_at_the_end_is_invalid() -> None:
    data = "ab€".encode()[:-1]
    with pytest.raises(PermanentError, match="byte offset 2"):
        collect(Chunker(10, 2), [data[:3], data[3:]])


def test_invalid_utf8_offset_counts_from_a_resumed_cursor() -> None:
    with pytest.raises(PermanentError, match="byte offset 1004"):
        collect(Chunker(10, 2), [b"abcd\xc3("], cursor=ChunkCursor(3, 1000))


def test_nul_byte_is_binary_content() -> None:
    data = b"some text\x00\x01\x02 binary"
    with pytest.raises(PermanentError, match=r"binary.*NUL byte at byte offset 9"):
        collect(Chunker(100, 10), [data[:4], data[4:]])
    with pytest.raises(PermanentError, match="NUL"):
        Chunker().split("a\x00b")


def test_binary_file_is_refused() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    with pytest.raises(PermanentError, match=r"not valid UTF-8.*byte offset 0"):
        collect(Chunker(), [png])


@pytest.mark.parametrize("data", [b"", b"   \n\t ", "\ufeff".encode()])
def test_empty_document(data: bytes) -> None:
    with pytest.raises(PermanentError, match="empty document"):
        collect(Chunker(), [data])


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (10, 10), (10, -1)])
def test_bad_settings(size: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        Chunker(size, overlap)


def test_memory_is_bounded_by_the_chunk_not_the_document() -> None:
    line = "the quick brown fox jumps over the lazy dog; ünïcödé €uro 𝄞 " * 3 + "\n"
    block = (line * (256 * 1024 // len(line))).encode()
    total = 16 * len(block)  # about 4 MB of text

    async def stream() -> AsyncIterator[bytes]:
        for _ in range(16):
            yield block

    async def run() -> tuple[int, int]:
        count = 0
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            async for _chunk in Chunker(1000, 100).chunks(stream()):
                count += 1
            return count, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    count, peak = asyncio.run(run())
    assert count > total // 2000
    # One 64 KiB piece decoded (up to 4 bytes per character in a str) plus a window.
    assert peak < 1_500_000, f"peak {peak:,} bytes for a {total:,}-byte document"
