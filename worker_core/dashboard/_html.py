"""Safe HTML by construction: every value is escaped unless it is ``Markup``.

Pages are built with ``h(tag, *children, **attrs)``: text children and attribute
values are escaped (payloads may hold ``<script>``), ``Markup`` (what ``h``
returns) is inserted as is. Attribute names come from code only: ``class_`` is
``class``, ``data_queue`` is ``data-queue``; ``True`` writes a bare attribute,
``None`` and ``False`` leave it out.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

__all__ = ["Markup", "ago", "esc", "h", "join", "pretty_json", "seconds", "timestamp", "url"]

_VOID = frozenset({"br", "col", "hr", "img", "input", "link", "meta"})


class Markup(str):
    """Text that is already HTML (never built from unescaped outside data)."""

    __slots__ = ()


Child = Any  # Markup | str | int | float | None | Iterable[Child]


def esc(value: object) -> Markup:
    """``value`` as HTML text (``Markup`` passes through)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(_clean(str(value)), quote=True))


def _clean(text: str) -> str:
    # A lone surrogate cannot be encoded into the UTF-8 response; show U+FFFD instead.
    return text.encode("utf-8", "replace").decode("utf-8")


def _attr_name(name: str) -> str:
    return name.rstrip("_").replace("_", "-")


def _children(children: Iterable[Child]) -> Iterable[str]:
    for child in children:
        if child is None or child is False:
            continue
        if isinstance(child, str | int | float):
            yield esc(child)
        else:
            yield from _children(child)


def h(tag: str, *children: Child, **attrs: object) -> Markup:
    """An element: ``h("a", "next", href=url("/jobs", before=10))``."""
    parts = [f"<{tag}"]
    for name, value in attrs.items():
        if value is None or value is False:
            continue
        if value is True:
            parts.append(f" {_attr_name(name)}")
        else:
            parts.append(f' {_attr_name(name)}="{esc(value)}"')
    parts.append(">")
    if tag in _VOID:
        return Markup("".join(parts))
    parts.extend(_children(children))
    parts.append(f"</{tag}>")
    return Markup("".join(parts))


def join(children: Iterable[Child]) -> Markup:
    """Several children as one fragment."""
    return Markup("".join(_children(children)))


def url(path: str, **query: object) -> str:
    """A local URL with the non-empty query parameters encoded."""
    items = [(k, str(v)) for k, v in query.items() if v is not None and v != ""]
    return f"{path}?{urlencode(items)}" if items else path


def pretty_json(value: Any, limit: int = 64_000) -> str:
    """Indented JSON, cut at ``limit`` characters with a note."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=True)
    if len(text) > limit:
        return text[:limit] + f"\n… ({len(text) - limit:,} more characters not shown)"
    return text


def timestamp(value: datetime | None) -> str:
    """UTC time to the second, or an em dash."""
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def seconds(value: float | None) -> str:
    """A duration for people: 850 ms, 12.3 s, 4 min 10 s, 2 h 5 min, 3 d 4 h."""
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.1f} s"
    minutes, secs = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def ago(value: datetime | None, now: datetime | None = None) -> str:
    """How long ago ``value`` was."""
    if value is None:
        return "—"
    delta = ((now or datetime.now(UTC)) - value).total_seconds()
    return f"{seconds(max(delta, 0.0))} ago"
