"""Chart geometry for the report's inline SVG, computed from the tables.

Two kinds of chart, both drawn by ``templates/charts.html.j2`` from the records here (the
template only places what this module computed — no scaling in the template):

- :func:`its_charts`: one small line chart per pipeline, it/s against batch size; the
  current run solid, the baseline (when given) dashed.
- :func:`memory_chart`: one horizontal bar chart per scenario, memory cpu and gpu per
  pipeline; baseline bars outlined and dashed beside the current ones.

Batch sizes sit at equal spacing (they are usually powers of two); the value axis starts at
zero and ends at a round number above the largest value shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from reports.formatting import gb, its, short
from reports.table import Row, Table


@dataclass(frozen=True)
class Tick:
    """A tick at ``position`` on its axis, its label drawn at ``(x, y)``."""

    position: float
    label: str
    x: float
    y: float


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    title: str


@dataclass(frozen=True)
class Line:
    name: str
    #: SVG path data (``M x y L x y …``).
    path: str
    points: tuple[Point, ...]
    css: str


@dataclass(frozen=True)
class LineChart:
    title: str
    width: int
    height: int
    left: float
    top: float
    right: float
    bottom: float
    x_ticks: tuple[Tick, ...]
    y_ticks: tuple[Tick, ...]
    lines: tuple[Line, ...]
    #: Where the title and the x-axis name are drawn.
    title_at: tuple[float, float]
    x_label_at: tuple[float, float]
    x_label: str = "batch size"
    y_label: str = "it/s"


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str


@dataclass(frozen=True)
class BarChart:
    title: str
    width: int
    height: int
    left: float
    top: float
    right: float
    bottom: float
    x_ticks: tuple[Tick, ...]
    bars: tuple[Bar, ...]
    #: Row labels, right-aligned at ``x`` left of the bars.
    labels: tuple[Tick, ...]
    x_label_at: tuple[float, float]
    x_label: str = "GB"


def nice_ceiling(value: float) -> float:
    """The smallest round number (1, 1.2, 1.6, 2, 2.4, 3, 4, 5, 6, 8 × 10^k) >= ``value``.

    Each of them splits into four round ticks; 1 for values <= 0.
    """
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for factor in (1.0, 1.2, 1.6, 2.0, 2.4, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0):
        candidate = factor * 10.0**exponent
        if candidate >= value * (1 - 1e-12):
            return candidate
    return 10.0 ** (exponent + 1)


def _ticks(top: float, count: int = 4) -> list[float]:
    return [top * i / count for i in range(count + 1)]


def _r(value: float) -> float:
    return round(value, 1)


# --- it/s against batch size --------------------------------------------------------------

_LINE_W, _LINE_H = 300, 180
_LINE_MARGIN = (46.0, 12.0, 26.0, 34.0)  # left, right, top, bottom


def _line(
    name: str, css: str, values: list[tuple[int, float | None]], x_of: dict[int, float],
    y_of: dict[str, float], x_name: str = "batch",
) -> Line | None:
    top, bottom, scale = y_of["top"], y_of["bottom"], y_of["max"]
    points = tuple(
        Point(_r(x_of[batch]), _r(bottom - (bottom - top) * value / scale),
              f"{name}, {x_name} {batch}: {its(value)} it/s")
        for batch, value in values
        if value is not None
    )
    if not points:
        return None
    path = " ".join(f"{'M' if i == 0 else 'L'}{p.x} {p.y}" for i, p in enumerate(points))
    return Line(name=name, path=path, points=points, css=css)


#: One line of a chart: (name, css class, (x, it/s or None) per point).
Series = tuple[str, str, list[tuple[int, float | None]]]


def _series_chart(
    title: str,
    xs: list[int],
    series: tuple[Series, ...],
    *,
    x_label: str = "batch size",
    x_name: str = "batch",
    tick_every: int = 1,
) -> LineChart:
    """it/s against an integer axis (batch size, A/B round), one line per series."""
    left, right_margin, top, bottom_margin = _LINE_MARGIN
    right, bottom = _LINE_W - right_margin, _LINE_H - bottom_margin
    step = (right - left) / max(len(xs), 1)
    x_of = {x: left + step * (i + 0.5) for i, x in enumerate(xs)}
    shown = [value for _, _, values in series for _, value in values if value is not None]
    scale = nice_ceiling(max(shown) * 1.05) if shown else 1.0
    y_of = {"top": top, "bottom": bottom, "max": scale}
    drawn = (_line(name, css, values, x_of, y_of, x_name) for name, css, values in series)
    return LineChart(
        title=title,
        width=_LINE_W,
        height=_LINE_H,
        left=left,
        top=top,
        right=right,
        bottom=bottom,
        x_ticks=tuple(
            Tick(_r(x_of[x]), str(x), _r(x_of[x]), bottom + 14)
            for i, x in enumerate(xs)
            if i % tick_every == 0
        ),
        y_ticks=tuple(
            Tick(y, its(v), left - 4, y + 4)
            for v in _ticks(scale)
            for y in (_r(bottom - (bottom - top) * v / scale),)
        ),
        lines=tuple(line for line in drawn if line is not None),
        title_at=(left, 14.0),
        x_label_at=(right, _LINE_H - 4.0),
        x_label=x_label,
    )


def its_chart(table: Table, row: Row) -> LineChart:
    """it/s against batch size for one pipeline (baseline dashed when present)."""
    current = [(slot.batch, slot.its if slot.ok else None) for slot in row.slots]
    baseline = [(slot.batch, slot.baseline_its) for slot in row.slots]
    series = (("baseline", "series-baseline", baseline), ("current", "series-current", current))
    return _series_chart(row.label, list(table.batches), series)


def its_charts(table: Table) -> list[LineChart]:
    """One chart per pipeline that has a figure to draw (all-failed rows have none); none
    when the scenario sweeps no batch sizes (a chart of single points says nothing)."""
    if len(table.batches) < 2:
        return []
    charts = (its_chart(table, row) for row in table.rows)
    return [chart for chart in charts if chart.lines]


# --- memory per pipeline ------------------------------------------------------------------

_BAR_W = 900
_BAR_LEFT, _BAR_RIGHT, _BAR_TOP, _BAR_BOTTOM = 300.0, 20.0, 10.0, 34.0
_BAR_H, _BAR_GAP, _GROUP_GAP = 9.0, 2.0, 12.0


def memory_chart(table: Table) -> BarChart | None:
    """Memory cpu/gpu per pipeline as horizontal bars; None when nothing was measured."""
    series: list[tuple[str, str, str]] = [  # (attribute, css, name)
        ("cpu_gb", "bar-cpu", "cpu"),
        ("baseline_cpu_gb", "bar-cpu bar-baseline", "cpu baseline"),
        ("gpu_gb", "bar-gpu", "gpu"),
        ("baseline_gpu_gb", "bar-gpu bar-baseline", "gpu baseline"),
    ]
    used = [
        (attribute, css, name)
        for attribute, css, name in series
        if any(getattr(row, attribute) is not None for row in table.rows)
    ]
    values = [getattr(row, a) for row in table.rows for a, _, _ in used]
    values = [v for v in values if v is not None]
    if not values:
        return None
    scale = nice_ceiling(max(values) * 1.05)
    group = len(used) * (_BAR_H + _BAR_GAP) - _BAR_GAP
    right = _BAR_W - _BAR_RIGHT
    span = right - _BAR_LEFT
    bars: list[Bar] = []
    labels: list[Tick] = []
    y = _BAR_TOP
    for row in table.rows:
        # ~48 characters fit left of the bars; the bars' titles carry the whole label
        label = short(row.label, 48)
        labels.append(Tick(_r(y + group / 2), label, _BAR_LEFT - 8, _r(y + group / 2 + 4)))
        for index, (attribute, css, name) in enumerate(used):
            value = getattr(row, attribute)
            if value is not None:
                bars.append(Bar(
                    x=_BAR_LEFT,
                    y=_r(y + index * (_BAR_H + _BAR_GAP)),
                    width=_r(max(span * value / scale, 0.5)),
                    height=_BAR_H,
                    css=css,
                    title=f"{row.label}: {name} {gb(value)} GB",
                ))
        y += group + _GROUP_GAP
    bottom = _r(y - _GROUP_GAP + 6)
    height = bottom + _BAR_BOTTOM
    return BarChart(
        title=f"{table.scenario}: memory per pipeline",
        width=_BAR_W,
        height=int(math.ceil(height)),
        left=_BAR_LEFT,
        top=_BAR_TOP,
        right=right,
        bottom=bottom,
        x_ticks=tuple(
            Tick(x, gb(v), x, bottom + 14)
            for v in _ticks(scale)
            for x in (_r(_BAR_LEFT + span * v / scale),)
        ),
        bars=tuple(bars),
        labels=tuple(labels),
        x_label_at=(right, height - 4),
    )


# --- A/B: it/s of base and head against round ---------------------------------------------


def rounds_chart(title: str, base: list[float | None], head: list[float | None]) -> LineChart:
    """Each side's it/s per round of an A/B cell, so drift over the run shows."""
    rounds = list(range(1, max(len(base), len(head)) + 1))
    series = (
        ("base", "series-baseline", list(zip(rounds, base, strict=False))),
        ("head", "series-current", list(zip(rounds, head, strict=False))),
    )
    return _series_chart(title, rounds, series, x_label="round", x_name="round",
                         tick_every=max(1, len(rounds) // 6))
