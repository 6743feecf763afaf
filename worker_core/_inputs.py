"""Checks of the arguments producers and operators hand to ``Queue``.

Every check runs before any SQL, so a refused call stores nothing, and raises
``ValueError`` or ``TypeError`` (``PayloadError`` for payloads) with a message that
names the argument and the rule. The bounds keep values inside what PostgreSQL's
columns and interval arithmetic hold: a job whose ``run_at`` is ``infinity`` could be
stored but never read back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from .errors import PayloadError

__all__ = [
    "MAX_DEDUPE_KEY_BYTES",
    "MAX_RUN_AT_SECONDS",
    "column",
    "float_param",
    "int_param",
    "job_id",
    "refuse_surrogates",
    "run_at_params",
    "text_param",
]

#: ``run_at`` may lie at most this far from now, in either direction (100 years).
MAX_RUN_AT_SECONDS = 100 * 365.25 * 86_400
#: The dedupe key shares a btree entry with the queue name; an entry is limited to
#: about 2.7 kB, so a longer key would fail inside the INSERT instead of here.
MAX_DEDUPE_KEY_BYTES = 1024
_INT32 = 2**31
_BIGINT = 2**63
_SURROGATE = re.compile("[\ud800-\udfff]")


def column(values: Sequence[Any] | None, n: int, name: str) -> list[Any]:
    """``values`` as a list of ``n`` items (``None`` for each when not given)."""
    if values is None:
        return [None] * n
    if isinstance(values, str | bytes):
        raise TypeError(f"{name} must be a sequence with one item per payload, not a string")
    items = list(values)
    if len(items) != n:
        raise ValueError(f"{name} has {len(items)} items for {n} payloads")
    return items


def int_param(value: Any, name: str, *, minimum: int = -_INT32, maximum: int = _INT32 - 1) -> int:
    """An ``int`` (not a bool, not a float) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return int(value)


def float_param(value: Any, name: str, *, minimum: float, maximum: float) -> float:
    """A finite number within ``[minimum, maximum]``, as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if isinstance(value, int) and abs(value) > 2**53:  # float() of a huge int overflows
        raise ValueError(f"{name} must be between {minimum:g} and {maximum:g}, got {value}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {number!r}")
    if not minimum <= number <= maximum:
        raise ValueError(f"{name} must be between {minimum:g} and {maximum:g}, got {number:g}")
    return number


def job_id(value: Any) -> int:
    """A job id: a positive bigint."""
    return int_param(value, "job_id", minimum=1, maximum=_BIGINT - 1)


def text_param(value: Any, name: str, *, max_bytes: int) -> str:
    """A non-empty string PostgreSQL text can hold (no NUL, no lone surrogate)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    if "\x00" in value:
        raise ValueError(f"{name} must not contain a NUL character (PostgreSQL refuses it)")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise ValueError(f"{name} contains a lone surrogate, which is not valid UTF-8") from None
    if size > max_bytes:
        raise ValueError(f"{name} is {size} bytes in UTF-8, over the limit of {max_bytes}")
    return value


def run_at_params(run_at: datetime | timedelta | float | None) -> dict[str, Any]:
    """``run_at`` as the ``run_at``/``delay`` parameters of the enqueue statement.

    A datetime must be timezone-aware; a timedelta or a number is seconds from now
    (negative: already due). Either way it must be finite and at most 100 years
    from now.
    """
    if run_at is None:
        return {"run_at": None, "delay": None}
    limit = MAX_RUN_AT_SECONDS
    if isinstance(run_at, datetime):
        if run_at.tzinfo is None or run_at.utcoffset() is None:
            raise ValueError("run_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
        try:
            distance = abs((run_at - datetime.now(UTC)).total_seconds())
        except OverflowError:
            distance = math.inf
        if distance > limit:
            raise ValueError(f"run_at {run_at.isoformat()} is more than 100 years from now")
        return {"run_at": run_at, "delay": None}
    if isinstance(run_at, timedelta):
        seconds = run_at.total_seconds()
        if abs(seconds) > limit:
            raise ValueError(f"run_at {run_at} is more than 100 years from now")
        return {"run_at": None, "delay": seconds}
    if isinstance(run_at, int | float) and not isinstance(run_at, bool):
        delay = float_param(run_at, "run_at (seconds from now)", minimum=-limit, maximum=limit)
        return {"run_at": None, "delay": delay}
    raise TypeError(
        f"run_at must be a datetime, a timedelta or seconds from now, not {type(run_at).__name__}"
    )


def refuse_surrogates(
    text: str, items: Sequence[Mapping[str, Any]], label: str, offset: int
) -> None:
    """Raise ``PayloadError`` naming the first item whose JSON holds a lone surrogate.

    ``json.dumps`` lets a lone surrogate (``"\\ud800"``) through, and the UTF-8
    encoding of the statement would then fail; an ASCII string is checked in O(1).
    """
    if text.isascii() or _SURROGATE.search(text) is None:
        return
    import json

    for i, item in enumerate(items):
        if _SURROGATE.search(json.dumps(item, ensure_ascii=False)):
            where = label if label == "payload" else f"{label}[{offset + i}]"
            raise PayloadError(
                f"{where} contains a lone surrogate (\\ud800-\\udfff), which is not valid UTF-8"
            )
