"""Validation of every input the dashboard reads: query strings, forms, JSON bodies.

Anything unexpected is a ``BadRequest`` with one clear sentence (answered 400):
unknown or repeated parameters, values too long, NUL or control characters,
bytes that are not UTF-8 (lone surrogates included), numbers that are not plain
integers in range (NaN, inf, 1e9 and huge values too), malformed JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

__all__ = ["MAX_ID", "BadRequest", "Params", "check_utf8", "job_id", "parse_form", "parse_ids"]

MAX_ID = 2**63 - 1
MAX_IDS = 1000
_INT = re.compile(r"^[0-9]{1,19}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadRequest(Exception):
    """A request the dashboard refuses, with the reason to show."""


def check_utf8(raw: str, what: str) -> None:
    """Refuse percent-encoded bytes that are not UTF-8 (yarl would turn them into U+FFFD)."""
    try:
        unquote_to_bytes(raw.replace("+", " ")).decode("utf-8", "strict")
    except UnicodeDecodeError:
        raise BadRequest(
            f"the {what} is not valid UTF-8 (invalid bytes or a lone surrogate)"
        ) from None


def clean_text(name: str, value: str, max_len: int) -> str:
    if len(value) > max_len:
        raise BadRequest(f"{name} is longer than {max_len} characters")
    if "\x00" in value:
        raise BadRequest(f"{name} contains a NUL character")
    if _CONTROL.search(value):
        raise BadRequest(f"{name} contains a control character")
    if "\ufffd" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise BadRequest(f"{name} is not valid UTF-8 (invalid bytes or a lone surrogate)")
    return value


def parse_int(name: str, text: str, lo: int, hi: int) -> int:
    if not _INT.match(text):
        raise BadRequest(f"{name} must be a whole number from {lo} to {hi}, not {text[:40]!r}")
    value = int(text)
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be from {lo} to {hi}, got {value}")
    return value


def job_id(text: str) -> int:
    """A job id from a URL path."""
    return parse_int("job id", text, 1, MAX_ID)


class Params:
    """The query parameters of one request, checked against the names a handler allows."""

    def __init__(self, query: Mapping[str, str] | Any, allowed: Collection[str]) -> None:
        items: list[tuple[str, str]] = list(query.items())
        seen: set[str] = set()
        for name, _ in items:
            if name not in allowed:
                known = ", ".join(sorted(allowed)) or "none"
                raise BadRequest(f"unknown parameter {name[:40]!r} (allowed: {known})")
            if name in seen:
                raise BadRequest(f"parameter {name!r} is given more than once")
            seen.add(name)
        self._values = dict(items)

    def text(self, name: str, *, max_len: int = 200) -> str | None:
        value = self._values.get(name)
        if value is None or value == "":
            return None
        return clean_text(name, value, max_len)

    def integer(self, name: str, *, lo: int, hi: int, default: int | None = None) -> int | None:
        value = self._values.get(name)
        if value is None or value == "":
            return default
        return parse_int(name, value, lo, hi)

    def choice(self, name: str, options: Sequence[str], default: str | None = None) -> str | None:
        value = self._values.get(name)
        if value is None or value == "":
            return default
        if value not in options:
            raise BadRequest(f"{name} must be one of {', '.join(options)}, not {value[:40]!r}")
        return value


def parse_form(body: bytes) -> dict[str, list[str]]:
    """An ``application/x-www-form-urlencoded`` body, strictly decoded."""
    try:
        text = body.decode("ascii")
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=False,
            errors="strict",
            max_num_fields=MAX_IDS + 20,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(
            f"the form is malformed or not valid UTF-8 ({type(exc).__name__})"
        ) from None
    form: dict[str, list[str]] = {}
    for name, value in pairs:
        clean_text("form field", name, 40)
        form.setdefault(name, []).append(clean_text(name, value, 2000))
    return form


def parse_ids(values: Any) -> list[int]:
    """Job ids from a form (strings) or a JSON body (integers), at most ``MAX_IDS``."""
    if not isinstance(values, list) or not values:
        raise BadRequest("ids must be a non-empty list of job ids")
    if len(values) > MAX_IDS:
        raise BadRequest(f"at most {MAX_IDS} ids per request")
    ids: list[int] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise BadRequest("every id must be a whole number")
        ids.append(parse_int("id", str(value), 1, MAX_ID))
    return sorted(set(ids))


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON object body (NaN and Infinity refused)."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(body.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest(f"the body is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value
