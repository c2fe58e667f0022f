"""Regression verdicts as the report reads them.

``harness.compare.compare(baseline, current)`` returns a DataFrame with one row per cell and
metric: ``scenario, cell_id, metric, baseline, current, change, verdict, p_value, threshold,
note``. This module turns that frame into typed :class:`Verdict` records, indexes them by
cell and metric for the table, and summarises them for the top of the report. It computes;
it does not format.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from harness.compare import COLUMNS as VERDICT_COLUMNS
from harness.compare import VERDICTS  # every verdict, in the order the summary lists them
from reports.formatting import number

#: Which verdict colours a table slot that has several (most severe first).
SEVERITY: tuple[str, ...] = (
    "regression",
    "not comparable",
    "missing",
    "improvement",
    "new",
    "unchanged",
)
#: The metric behind the table's it/s figures and its memory column.
SPEED_METRIC = "its"
MEMORY_METRICS: tuple[str, ...] = ("cpu_peak_gb", "gpu_allocated_peak_gb")

#: How the report names the metrics ``compare`` judges (others appear under their column name).
METRIC_LABELS: dict[str, str] = {
    "its": "it/s",
    "denoise_its": "denoise it/s",
    "cpu_peak_gb": "memory cpu",
    "gpu_allocated_peak_gb": "memory gpu",
    "load_s": "load time",
}



def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    return str(value)


@dataclass(frozen=True)
class Verdict:
    """One row of ``compare``'s output."""

    scenario: str
    cell_id: str
    metric: str
    baseline: float | None
    current: float | None
    change: float | None
    verdict: str
    p_value: float | None = None
    threshold: float | None = None
    note: str | None = None

    @property
    def css_class(self) -> str:
        """``verdict-not-comparable`` etc.: the class that colours it."""
        return css_class(self.verdict)

    @property
    def metric_label(self) -> str:
        return METRIC_LABELS.get(self.metric, self.metric)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Verdict:
        verdict = _text(row.get("verdict"))
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        return cls(
            scenario=str(row["scenario"]),
            cell_id=str(row["cell_id"]),
            metric=str(row["metric"]),
            baseline=number(row.get("baseline")),
            current=number(row.get("current")),
            change=number(row.get("change")),
            verdict=verdict,
            p_value=number(row.get("p_value")),
            threshold=number(row.get("threshold")),
            note=_text(row.get("note")),
        )


def css_class(verdict: str) -> str:
    return "verdict-" + verdict.replace(" ", "-")


def from_frame(frame: pd.DataFrame | None) -> list[Verdict]:
    """Typed verdicts from ``compare``'s frame (None or empty gives none)."""
    if frame is None or frame.empty:
        return []
    missing = [column for column in ("scenario", "cell_id", "metric", "verdict")
               if column not in frame.columns]
    if missing:
        raise ValueError(f"verdicts: missing columns {missing}; expected {VERDICT_COLUMNS}")
    return [Verdict.from_row(row) for row in frame.to_dict(orient="records")]


def worst(verdicts: Iterable[Verdict]) -> Verdict | None:
    """The most severe verdict of several (see :data:`SEVERITY`), or None."""
    ranked = sorted(verdicts, key=lambda v: SEVERITY.index(v.verdict))
    return ranked[0] if ranked else None


class VerdictIndex:
    """Verdicts looked up by ``(scenario, cell_id, metric)``."""

    def __init__(self, verdicts: Iterable[Verdict]) -> None:
        self._by_key: dict[tuple[str, str, str], Verdict] = {}
        for verdict in verdicts:
            self._by_key[(verdict.scenario, verdict.cell_id, verdict.metric)] = verdict

    def get(self, scenario: str, cell_id: str, metric: str) -> Verdict | None:
        return self._by_key.get((scenario, cell_id, metric))

    def memory(self, scenario: str, cell_ids: Iterable[str]) -> tuple[Verdict, ...]:
        """The memory verdicts of a table row's cells, most severe first."""
        found = [
            verdict
            for cell_id in cell_ids
            for metric in MEMORY_METRICS
            if (verdict := self.get(scenario, cell_id, metric)) is not None
        ]
        return tuple(sorted(found, key=lambda v: SEVERITY.index(v.verdict)))


@dataclass(frozen=True)
class VerdictSummary:
    """The verdict block at the top of a regression report."""

    #: ``(verdict, count)`` for every verdict in :data:`VERDICTS` order, zero counts included.
    counts: tuple[tuple[str, int], ...]
    total: int
    cells: int
    #: regression / improvement / not comparable / missing / new rows, most severe first.
    notable: tuple[Verdict, ...]
    regressions: tuple[Verdict, ...]

    @property
    def has_regression(self) -> bool:
        return bool(self.regressions)

    @property
    def headline(self) -> str:
        """One line for the banner: the outcome in words."""
        if self.total == 0:
            return "no verdicts: nothing in common with the baseline"
        if self.regressions:
            count = len(self.regressions)
            return f"{count} regression{'s' if count != 1 else ''} against the baseline"
        return "no regressions against the baseline"


def summarize(verdicts: list[Verdict]) -> VerdictSummary:
    counts = {name: 0 for name in VERDICTS}
    for verdict in verdicts:
        counts[verdict.verdict] += 1
    notable = sorted(
        (v for v in verdicts if v.verdict != "unchanged"),
        key=lambda v: (SEVERITY.index(v.verdict), v.scenario, v.cell_id, v.metric),
    )
    return VerdictSummary(
        counts=tuple(counts.items()),
        total=len(verdicts),
        cells=len({(v.scenario, v.cell_id) for v in verdicts}),
        notable=tuple(notable),
        regressions=tuple(v for v in notable if v.verdict == "regression"),
    )
