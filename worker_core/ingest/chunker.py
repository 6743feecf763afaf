"""The streaming chunker: UTF-8 bytes in, overlapping text chunks out, resumable.

Memory is bounded by the chunk size plus one decoded piece of the stream (pieces
are cut to at most ``MAX_PIECE`` bytes before decoding), never by the document.
A multi-byte character split between two stream chunks is decoded once both
halves have arrived (an incremental decoder).

Chunk boundaries depend only on the text from a chunk's start onward, so a
chunker started at a ``ChunkCursor`` (the byte offset and index of the next
chunk) produces exactly the chunks an uninterrupted run would have produced
from there: a crashed stage restarts with a ranged read, not from the top.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from worker_core.errors import PermanentError

__all__ = ["MAX_PIECE", "ChunkCursor", "Chunker", "TextChunk"]

#: Stream pieces larger than this are decoded in slices, to bound the buffer.
MAX_PIECE = 64 * 1024
_BOM = "\ufeff"
# Preferred break points, strongest first: a paragraph, a line, a sentence, a word.
_BREAKS = ("\n\n", "\n", ". ", " ")
# ASCII whitespace only: str.isspace() follows the Unicode database of the running
# Python, and chunk boundaries must not change with the interpreter.
_SPACE = " \t\n\r\f\v"


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


@dataclass(frozen=True)
class ChunkCursor:
    """Where chunking resumes: the next chunk's index and its byte offset.

    ``done`` means the document's last chunk has been produced.
    """

    index: int = 0
    offset: int = 0
    done: bool = False

    def to_state(self) -> dict[str, Any]:
        """A JSON-serialisable form for ``ctx.state``."""
        return {"index": self.index, "offset": self.offset, "done": self.done}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> ChunkCursor:
        if not state:
            return cls()
        return cls(int(state["index"]), int(state["offset"]), bool(state.get("done", False)))


@dataclass(frozen=True)
class TextChunk:
    """One chunk: its text, its byte span in the document and the cursor after it."""

    index: int
    text: str
    start: int
    end: int
    cursor: ChunkCursor


class _Splitter:
    """The boundary rule over decoded text; knows nothing about bytes on the wire."""

    def __init__(self, size: int, overlap: int, cursor: ChunkCursor) -> None:
        self.size = size
        self.overlap = overlap
        # The shortest chunk a break may cut: always longer than the overlap, so
        # every chunk moves the start forward.
        self.min_len = max(overlap + 1, size // 2)
        self.buf = ""
        self.pos = 0  # start of the next chunk in buf
        self.pos_byte = cursor.offset  # its byte offset in the document
        self.index = cursor.index

    def feed(self, text: str) -> Iterable[TextChunk]:
        self.buf = self.buf[self.pos :] + text if self.pos else self.buf + text
        self.pos = 0
        # Strictly more than a window: the chunk cannot be the last one.
        while len(self.buf) - self.pos > self.size:
            chunk = self._next(final=False)
            if chunk is not None:
                yield chunk

    def finish(self) -> Iterable[TextChunk]:
        while self.pos < len(self.buf):
            chunk = self._next(final=len(self.buf) - self.pos <= self.size)
            if chunk is not None:
                yield chunk

    def _next(self, *, final: bool) -> TextChunk | None:
        buf, pos = self.buf, self.pos
        if final:
            end = len(buf)
            nxt = end
        else:
            window_end = pos + self.size
            end = window_end
            for sep in _BREAKS:
                found = buf.rfind(sep, pos + self.min_len, window_end)
                if found >= 0:
                    end = found + len(sep)
                    break
            nxt = end - self.overlap
            if self.overlap and buf[nxt - 1] not in _SPACE:
                # Mid-word: the overlap starts at the next word instead.
                space = buf.find(" ", nxt, end - 1)
                if space >= 0:
                    nxt = space + 1
        text = buf[pos:end]
        start_byte = self.pos_byte
        end_byte = start_byte + _utf8_len(text)
        next_byte = end_byte if final else start_byte + _utf8_len(buf[pos:nxt])
        self.pos, self.pos_byte = nxt, next_byte
        if not text.strip(_SPACE):
            return None  # nothing to embed; it takes no index
        index = self.index
        self.index += 1
        return TextChunk(
            index, text, start_byte, end_byte, ChunkCursor(index + 1, next_byte, final)
        )


class Chunker:
    """Splits UTF-8 text into chunks of at most ``chunk_size`` characters.

    A chunk ends at the last paragraph, line, sentence or word break in the
    second half of its window (a hard cut when there is none), and the next one
    starts ``overlap`` characters before that end (moved forward to the next
    word when that falls inside one). Whitespace-only chunks are dropped. A
    leading UTF-8 byte order mark is skipped. Boundaries depend on nothing but
    the text, so the same document gives the same chunks on every machine.

    Args:
        chunk_size: the longest chunk, in characters.
        overlap: characters shared by consecutive chunks (less than ``chunk_size``).
    """

    def __init__(self, chunk_size: int = 1000, overlap: int = 100) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if not 0 <= overlap < chunk_size:
            raise ValueError("overlap must be at least 0 and less than chunk_size")
        self.chunk_size = chunk_size
        self.overlap = overlap

    def __repr__(self) -> str:
        return f"Chunker(chunk_size={self.chunk_size}, overlap={self.overlap})"

    async def chunks(
        self,
        stream: AsyncIterable[bytes],
        *,
        cursor: ChunkCursor | None = None,
        name: str = "document",
    ) -> AsyncGenerator[TextChunk, None]:
        """Chunks of the UTF-8 ``stream``.

        Args:
            stream: the document's bytes; when resuming, starting at ``cursor.offset``.
            cursor: resume here (from a chunk's ``cursor``); ``None`` starts at 0.
            name: how errors name the document.

        Raises:
            PermanentError: invalid UTF-8 or a NUL byte (binary content), with the
                byte offset; or an empty document.
        """
        cursor = cursor or ChunkCursor()
        if cursor.done:
            return
        splitter = _Splitter(self.chunk_size, self.overlap, cursor)
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        fed = cursor.offset  # absolute offset of the next byte handed to the decoder
        decoded = cursor.offset  # absolute offset of the next decoded character
        at_start = cursor.offset == 0
        async for piece in stream:
            view = memoryview(piece)
            for i in range(0, len(view), MAX_PIECE):
                part = view[i : i + MAX_PIECE]
                text = _decode(decoder, part, fed, name, final=False)
                fed += len(part)
                if not text:
                    continue
                if at_start:
                    at_start = False
                    if text.startswith(_BOM):
                        text = text[1:]
                        decoded += 3
                        splitter.pos_byte += 3
                _check_nul(text, decoded, name)
                decoded += _utf8_len(text)
                for chunk in splitter.feed(text):
                    yield chunk
        # Raises when the stream ends inside a multi-byte character; else returns "".
        _decode(decoder, b"", fed, name, final=True)
        for chunk in splitter.finish():
            yield chunk
        if splitter.index == 0:
            raise PermanentError(f"empty document: {name} has no text", document=name)

    def split(self, text: str) -> list[TextChunk]:
        """The chunks of a whole string (byte offsets as if it were UTF-8 encoded)."""
        if "\x00" in text:
            _check_nul(text, 0, "text")
        splitter = _Splitter(self.chunk_size, self.overlap, ChunkCursor())
        out = [*splitter.feed(text), *splitter.finish()]
        if not out:
            raise PermanentError("empty document: the text has no content")
        return out


def _decode(
    decoder: codecs.IncrementalDecoder,
    data: bytes | memoryview,
    fed: int,
    name: str,
    *,
    final: bool,
) -> str:
    pending = len(decoder.getstate()[0])
    try:
        return decoder.decode(data, final)
    except UnicodeDecodeError as exc:
        # exc.start counts from the bytes the decoder held back plus this piece.
        offset = fed - pending + exc.start
        raise PermanentError(
            f"{name} is not valid UTF-8 ({exc.reason} at byte offset {offset})",
            offset=offset,
        ) from None


def _check_nul(text: str, offset: int, name: str) -> None:
    at = text.find("\x00")
    if at >= 0:
        where = offset + _utf8_len(text[:at])
        raise PermanentError(
            f"{name} looks binary: a NUL byte at byte offset {where} "
            "(PostgreSQL text cannot store it)",
            offset=where,
        )
