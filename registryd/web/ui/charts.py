"""Charts as server-rendered SVG: geometry computed here, drawn by the template (escaped)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import attrs

from registryd.units import human_size
from registryd.web.ui.traffic import Counts

WIDTH = 600.0
HEIGHT = 140.0
PAD_LEFT = 4.0
PAD_TOP = 8.0
PLOT_HEIGHT = HEIGHT - PAD_TOP - 4.0


@attrs.frozen
class Line:
    css: str                 # a class the stylesheet colours
    label: str
    points: str              # "x,y x,y ..." in the viewBox
    total: str


@attrs.frozen
class Chart:
    """One chart: lines over the last day, its scale and its legend."""

    title: str
    slug: str
    lines: tuple[Line, ...]
    top: str                 # the value at the top of the scale
    width: float = WIDTH
    height: float = HEIGHT
    summary: str = ""        # for screen readers and the DOM: what the chart says in words

    @property
    def view_box(self) -> str:
        return f"0 0 {self.width:g} {self.height:g}"

    @property
    def baseline(self) -> float:
        return PAD_TOP + PLOT_HEIGHT

    @property
    def gridlines(self) -> tuple[float, ...]:
        return tuple(PAD_TOP + PLOT_HEIGHT * f for f in (0.0, 0.5))


def _nice(value: float) -> float:
    """A round number at or above ``value`` for the top of a scale."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power


def _points(values: Sequence[float | None], top: float) -> str:
    if not values:
        return ""
    step = (WIDTH - PAD_LEFT) / max(len(values) - 1, 1)
    out = []
    for i, value in enumerate(values):
        v = 0.0 if value is None else value
        y = PAD_TOP + PLOT_HEIGHT * (1 - min(v / top, 1.0))
        out.append(f"{PAD_LEFT + i * step:.1f},{y:.1f}")
    return " ".join(out)


def _chart(title: str, slug: str, series: list[tuple[str, str, list[float | None], str]],
           fmt: Callable[[float], str], top: float | None = None) -> Chart:
    peak = max((v for _, _, values, _ in series for v in values if v is not None), default=0.0)
    scale = top if top is not None else _nice(peak)
    lines = tuple(Line(css, label, _points(values, scale), total) for css, label, values, total in series)
    summary = "; ".join(f"{label}: {total}" for _, label, _, total in series)
    return Chart(title, slug, lines, fmt(scale), summary=f"{title} over the last 24 hours — {summary}")


def traffic_charts(series: list[tuple[float, Counts]]) -> list[Chart]:
    """Requests, bytes and hit rate over the last day."""
    hits: list[float | None] = [float(c.hits) for _, c in series]
    misses: list[float | None] = [float(c.misses) for _, c in series]
    cached: list[float | None] = [float(c.bytes_cached) for _, c in series]
    fetched: list[float | None] = [float(c.bytes_upstream) for _, c in series]
    rate: list[float | None] = [None if c.hit_rate is None else c.hit_rate * 100 for _, c in series]
    total_hits = sum(c.hits for _, c in series)
    total_misses = sum(c.misses for _, c in series)
    bytes_cached = sum(c.bytes_cached for _, c in series)
    bytes_fetched = sum(c.bytes_upstream for _, c in series)
    all_requests = total_hits + total_misses
    overall = f"{100 * total_hits / all_requests:.1f}%" if all_requests else "n/a"
    return [
        _chart("Requests", "requests", [("hit", "from cache", hits, f"{total_hits:,}"),
                                        ("miss", "from upstream", misses, f"{total_misses:,}")],
               lambda v: f"{v:,.0f}"),
        _chart("Bytes sent", "bytes", [("hit", "from cache", cached, human_size(bytes_cached)),
                                       ("miss", "from upstream", fetched, human_size(bytes_fetched))],
               lambda v: human_size(int(v))),
        _chart("Hit rate", "hit-rate", [("rate", "hit rate", rate, overall)], lambda v: f"{v:.0f}%", top=100.0),
    ]
