"""Small SVG charts for `batchgen report`: line charts and bar charts with axes, ticks, units and
a legend, drawn as inline SVG text so a page that holds them needs no script and no network.

Every data mark carries the class `mark` (points of a line, bars) and a <title> with its value,
which a browser shows on hover.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 70, 16, 34, 50  # the plot area's margins
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif"
# Colour-blind-safe categorical colours (Okabe-Ito), one per series.
COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")

Point = tuple[float, float]


def nice_ticks(lo: float, hi: float, count: int = 5, whole: bool = False) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]; `whole`:
    whole numbers only (token counts)."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if whole:
        step = max(step, 1)
    ticks = [round(math.floor(lo / step) * step, 10)]
    while ticks[-1] < hi:  # the last tick is at or above the highest value
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def fmt(value: float) -> str:
    """A tick label: 1,200 / 1.5k / 2.5M / 0.25."""
    if abs(value) >= 1e6:
        return f"{value / 1e6:g}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:g}k"
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:g}"


class _Frame:
    """A plot area with its scales, axes and labels."""

    def __init__(
        self,
        title: str,
        x_label: str,
        y_label: str,
        x_range: tuple[float, float],
        y_range: tuple[float, float],
        x_ticks: list[float] | None = None,
        x_whole: bool = False,
        y_whole: bool = False,
    ) -> None:
        self.title, self.x_label, self.y_label = title, x_label, y_label
        # x_ticks=[]: categories, labelled by the chart itself
        self.x_ticks = nice_ticks(*x_range, whole=x_whole) if x_ticks is None else x_ticks
        self.y_ticks = nice_ticks(*y_range, whole=y_whole)
        self.x0, self.x1 = min([*self.x_ticks, x_range[0]]), max([*self.x_ticks, x_range[1]])
        self.y0, self.y1 = min(self.y_ticks[0], y_range[0]), max(self.y_ticks[-1], y_range[1])
        if self.x1 == self.x0:
            self.x1 = self.x0 + 1
        if self.y1 == self.y0:
            self.y1 = self.y0 + 1

    def sx(self, x: float) -> float:
        return LEFT + (x - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def sy(self, y: float) -> float:
        return HEIGHT - BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)

    def svg(self, body: list[str], legend: Sequence[tuple[str, str]] = ()) -> str:
        bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
        parts = [
            f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}"'
            f' width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(self.title)}"'
            f' style="{FONT};font-size:12px">',
            f'<text x="{LEFT}" y="18" font-size="14" font-weight="600" fill="#222">'
            f"{escape(self.title)}</text>",
        ]
        for t in self.y_ticks:
            y = self.sy(t)
            parts.append(
                f'<line x1="{LEFT}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#444">'
                f"{fmt(t)}</text>"
            )
        for t in self.x_ticks:
            x = self.sx(t)
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 5}" stroke="#444"/>'
                f'<text x="{x:.1f}" y="{bottom + 18}" text-anchor="middle" fill="#444">'
                f"{fmt(t)}</text>"
            )
        parts += body
        parts += [
            f'<line x1="{LEFT}" x2="{right}" y1="{bottom}" y2="{bottom}" stroke="#444"/>',
            f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{bottom}" stroke="#444"/>',
            f'<text x="{(LEFT + right) / 2:.1f}" y="{HEIGHT - 10}" text-anchor="middle" '
            f'fill="#222">{escape(self.x_label)}</text>',
            f'<text transform="translate(16 {(TOP + bottom) / 2:.1f}) rotate(-90)" '
            f'text-anchor="middle" fill="#222">{escape(self.y_label)}</text>',
        ]
        x = right
        for name, colour in reversed(legend):  # right-aligned, on the title's line
            x -= 14 + 7 * len(name)
            parts.append(
                f'<rect x="{x}" y="9" width="10" height="10" fill="{colour}"/>'
                f'<text x="{x + 14}" y="18" fill="#222">{escape(name)}</text>'
            )
            x -= 10
        parts.append("</svg>")
        return "".join(parts)


def line_chart(
    title: str,
    x_label: str,
    y_label: str,
    series: Sequence[tuple[str, Sequence[Sequence[Point]]]],
    x_range: tuple[float, float] | None = None,
    markers: Sequence[tuple[float, str]] = (),
) -> str:
    """One line per series, each a list of segments (a gap between segments: a new run); the y
    axis starts at 0, the x axis spans `x_range` (default: the data). `markers`: dashed vertical
    lines at these x values; the first one's label is written beside it."""
    points = [p for _, segments in series for seg in segments for p in seg]
    xs, ys = [p[0] for p in points] or [0.0], [p[1] for p in points] or [0.0]
    frame = _Frame(title, x_label, y_label, x_range or (min(xs), max(xs)), (0.0, max(ys)))
    body = []
    for i, (x, label) in enumerate(markers):
        sx = frame.sx(x)
        body.append(
            f'<line x1="{sx:.1f}" x2="{sx:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" stroke="#888" '
            f'stroke-dasharray="4 3"><title>{escape(label)}</title></line>'
        )
        if i == 0:  # beside the line, on the side with room
            left = sx > LEFT + 0.6 * (WIDTH - LEFT - RIGHT)
            body.append(
                f'<text x="{sx - 4 if left else sx + 4:.1f}" y="{TOP + 12}" fill="#666" '
                f'font-size="11" text-anchor="{"end" if left else "start"}">{escape(label)}</text>'
            )
    legend = []
    for i, (name, segments) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        legend.append((name, colour))
        for seg in segments:
            path = " ".join(f"{frame.sx(x):.1f},{frame.sy(y):.1f}" for x, y in seg)
            if len(seg) > 1:
                body.append(
                    f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>'
                )
            for x, y in seg:
                body.append(
                    f'<circle class="mark" cx="{frame.sx(x):.1f}" cy="{frame.sy(y):.1f}" r="3" '
                    f'fill="{colour}"><title>{escape(name)}: {fmt(round(x, 2))} '
                    f"{escape(_unit(x_label))}, {fmt(round(y, 2))} {escape(_unit(y_label))}"
                    "</title></circle>"
                )
    return frame.svg(body, legend if len(series) > 1 else ())


def histogram(
    title: str, x_label: str, y_label: str, counts: dict[int, int], bins: int = 24
) -> str:
    """Integer values (e.g. token counts) in equal-width bins of round size."""
    lo, hi = min(counts), max(counts)
    width = max(1, _round_up((hi - lo + 1) / bins))
    start = (lo // width) * width
    totals: dict[int, int] = {}
    for value, n in counts.items():
        edge = start + ((value - start) // width) * width
        totals[edge] = totals.get(edge, 0) + n
    end = max(totals) + width
    if (end - start) / width < 10:  # a few bins: pad the axis so that bars stay bars
        pad = (10 * width - (end - start)) // 2
        start, end = max(start - pad, 0), end + pad
    frame = _Frame(
        title, x_label, y_label, (start, end), (0, max(totals.values())), x_whole=True, y_whole=True
    )
    body = []
    for edge, n in sorted(totals.items()):
        x0, x1 = frame.sx(edge), frame.sx(edge + width)
        y = frame.sy(n)
        what = f"{edge:,}" if width == 1 else f"{edge:,}-{edge + width - 1:,}"
        body.append(
            f'<rect class="mark" x="{x0 + 0.5:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
            f'height="{frame.sy(0) - y:.1f}" fill="{COLOURS[0]}"><title>{what} '
            f"{escape(_unit(x_label))}: {n:,} {escape(_unit(y_label))}</title></rect>"
        )
    return frame.svg(body)


def bar_chart(title: str, x_label: str, y_label: str, bars: Sequence[tuple[str, int]]) -> str:
    """One bar per category, labelled under it."""
    top = max(v for _, v in bars)
    frame = _Frame(title, x_label, y_label, (0, len(bars)), (0, top), [], y_whole=True)
    slot = (WIDTH - LEFT - RIGHT) / len(bars)
    body = []
    for i, (name, value) in enumerate(bars):
        x = LEFT + i * slot + slot * 0.2
        y = frame.sy(value)
        colour = COLOURS[i % len(COLOURS)]
        body.append(
            f'<rect class="mark" x="{x:.1f}" y="{y:.1f}" width="{slot * 0.6:.1f}" '
            f'height="{frame.sy(0) - y:.1f}" fill="{colour}"><title>{escape(name)}: {value:,}'
            f"</title></rect>"
            f'<text x="{x + slot * 0.3:.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="middle" '
            f'fill="#222">{escape(name)}</text>'
            f'<text x="{x + slot * 0.3:.1f}" y="{y - 5:.1f}" text-anchor="middle" fill="#222">'
            f"{value:,}</text>"
        )
    return frame.svg(body)


def _round_up(value: float) -> int:
    """The smallest of 1, 2, 5 x 10^k at least `value`."""
    power = 10 ** math.floor(math.log10(max(value, 1)))
    return int(next(m * power for m in (1, 2, 5, 10) if m * power >= value))


def _unit(label: str) -> str:
    """The unit of an axis label "what (unit)", else the label."""
    if label.endswith(")") and "(" in label:
        return label[label.rindex("(") + 1 : -1]
    return label
