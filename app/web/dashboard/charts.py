"""Geometry for the dashboard's inline SVG charts (no JavaScript chart library)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class LineChart:
    width: int
    height: int
    points: str  # SVG polyline points
    area: str  # closed polygon under the line
    peak: int
    ticks: list[tuple[float, str, str]]  # (x, label, text-anchor)
    last: int
    dots: list[tuple[float, float, int, str]]  # (x, y, value, label) for <title> tooltips


def line_chart(
    values: list[int], times: list[datetime], *, width: int = 480, height: int = 120, pad: int = 4
) -> LineChart:
    """Scale a series into a width × height box (y grows downwards in SVG)."""
    peak = max(values, default=0)
    span = max(peak, 1)
    n = max(len(values) - 1, 1)
    inner_w, inner_h = width - 2 * pad, height - 2 * pad

    def x(i: int) -> float:
        return round(pad + inner_w * i / n, 1)

    def y(v: int) -> float:
        return round(pad + inner_h * (1 - v / span), 1)

    coords = [(x(i), y(v)) for i, v in enumerate(values)]
    points = " ".join(f"{a},{b}" for a, b in coords)
    area = f"{x(0)},{height - pad} {points} {x(len(values) - 1)},{height - pad}" if values else ""
    step = max(1, len(times) // 4)
    last = len(times) - 1
    # The end labels are anchored inwards so they are not clipped by the viewBox.
    ticks = [
        (x(i), t.strftime("%H:%M"), "start" if i == 0 else "end" if i == last else "middle")
        for i, t in enumerate(times)
        if (i % step == 0 and last - i >= step // 2) or i == last
    ]
    dots = [
        (a, b, v, times[i].strftime("%H:%M"))
        for i, ((a, b), v) in enumerate(zip(coords, values, strict=True))
    ]
    return LineChart(width, height, points, area, peak, ticks, values[-1] if values else 0, dots)


def bar_widths(counts: dict[str, int], width: int = 200) -> list[tuple[str, int, float]]:
    """(label, count, bar width) rows for a horizontal bar chart, largest first."""
    peak = max(counts.values(), default=0) or 1
    return [
        (k, v, round(width * v / peak, 1)) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
