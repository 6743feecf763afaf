"""SVG charts drawn on the server: no JavaScript library, no build step, no CDN.

``bars`` draws stacked bars over time (throughput per minute, failures) with a
light grid, the maximum on the y axis and three time labels; every label is
escaped. Colours are SVG presentation attributes, which a strict
Content-Security-Policy (no inline styles) allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from ._html import Markup, h, join

__all__ = ["bars"]

WIDTH, HEIGHT = 640, 180
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 8, 22, 22


def _nice(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value``."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** len(str(int(value))) / 10 if value >= 1 else 1.0
    for factor in (1, 2, 5, 10):
        if value <= factor * magnitude:
            return float(factor * magnitude)
    return float(value)


def _number(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    return f"{value:g}"


def bars(
    title: str,
    xs: Sequence[datetime],
    stacks: Sequence[tuple[str, str, Sequence[float]]],
    *,
    unit: str = "jobs",
) -> Markup:
    """A stacked bar chart: ``stacks`` is ``(label, colour, values)`` per layer."""
    n = max(1, len(xs))
    totals = [sum(layer[2][i] for layer in stacks) for i in range(len(xs))]
    top = _nice(max(totals, default=0.0))
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    slot = plot_w / n
    width = max(slot * 0.8, 1.0)
    parts: list[Markup] = [h("title", title)]
    for frac in (0.0, 0.5, 1.0):
        y = _TOP + plot_h * (1 - frac)
        parts.append(
            h(
                "line",
                x1=_LEFT,
                x2=WIDTH - _RIGHT,
                y1=f"{y:.1f}",
                y2=f"{y:.1f}",
                stroke="#d9dde3",
                stroke_width=1,
            )
        )
        parts.append(
            h(
                "text",
                _number(top * frac),
                x=_LEFT - 6,
                y=f"{y + 4:.1f}",
                text_anchor="end",
                font_size=11,
                fill="#5b6472",
            )
        )
    for i in range(len(xs)):
        base = 0.0
        for label, colour, values in stacks:
            value = values[i]
            if value <= 0:
                continue
            y1 = _TOP + plot_h * (1 - (base + value) / top)
            bar_h = plot_h * value / top
            x = _LEFT + i * slot + (slot - width) / 2
            parts.append(
                h(
                    "rect",
                    h("title", f"{xs[i]:%H:%M} {label}: {value:g} {unit}"),
                    x=f"{x:.1f}",
                    y=f"{y1:.1f}",
                    width=f"{width:.1f}",
                    height=f"{max(bar_h, 0.5):.1f}",
                    fill=colour,
                )
            )
            base += value
    if xs:
        for i, anchor in ((0, "start"), (len(xs) // 2, "middle"), (len(xs) - 1, "end")):
            x = _LEFT + i * slot + slot / 2
            parts.append(
                h(
                    "text",
                    f"{xs[i]:%H:%M}",
                    x=f"{x:.1f}",
                    y=HEIGHT - 6,
                    text_anchor=anchor,
                    font_size=11,
                    fill="#5b6472",
                )
            )
    legend_x = _LEFT
    for label, colour, _ in stacks:
        parts.append(h("rect", x=legend_x, y=6, width=10, height=10, fill=colour))
        parts.append(h("text", label, x=legend_x + 14, y=15, font_size=11, fill="#2b3340"))
        legend_x += 14 + 7 * len(label) + 16
    parts.append(
        h(
            "text",
            title,
            x=WIDTH - _RIGHT,
            y=15,
            text_anchor="end",
            font_size=12,
            font_weight="bold",
            fill="#2b3340",
        )
    )
    return h(
        "svg",
        join(parts),
        xmlns="http://www.w3.org/2000/svg",
        role="img",
        viewBox=f"0 0 {WIDTH} {HEIGHT}",
        width=WIDTH,
        height=HEIGHT,
        aria_label=title,
    )
