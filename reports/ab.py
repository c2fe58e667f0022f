"""A/B runs (``python -m harness ab``) for the report: one row per cell, computed here.

Each row has the cell, its verdict (the paired one of ``its``, or ``error`` / ``not
comparable``), the it/s ratio head / base with its confidence interval, the rounds it took,
the other judged metrics, and a chart of both sides' it/s against the round. The templates
only lay them out; the environments of both sides are shown side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reports.charts import LineChart, rounds_chart
from reports.environment import Environment, EnvTable, environment_table


@dataclass(frozen=True)
class MetricRatio:
    metric: str
    verdict: str
    ratio: float
    low: float
    high: float

    @property
    def css(self) -> str:
        return verdict_css(self.verdict)


@dataclass(frozen=True)
class ABRow:
    scenario: str
    cell_id: str
    verdict: str
    reason: str | None
    rounds: int
    residency: str
    seed: int
    its: MetricRatio | None
    others: tuple[MetricRatio, ...]
    chart: LineChart | None

    @property
    def css(self) -> str:
        return verdict_css(self.verdict)


@dataclass(frozen=True)
class ABSection:
    rows: tuple[ABRow, ...]
    environment: EnvTable
    counts: tuple[tuple[str, int], ...]


def verdict_css(verdict: str) -> str:
    """``verdict-regression`` …; inconclusive reads like a missing verdict, errors like one."""
    shown = {"inconclusive": "missing", "error": "regression"}.get(verdict, verdict)
    return "verdict-" + shown.replace(" ", "-")


def _ratio(found: dict[str, Any]) -> MetricRatio:
    return MetricRatio(found["metric"], found["verdict"], found["ratio"], found["low"],
                       found["high"])


def build_ab(records: Sequence[dict[str, Any]]) -> ABSection | None:
    """The A/B section of a report, or None without A/B records."""
    if not records:
        return None
    rows = []
    for record in records:
        verdicts = [_ratio(found) for found in record.get("verdicts") or []]
        its = next((v for v in verdicts if v.metric == "its"), None)
        series = record.get("series") or {}
        base = [entry.get("its") for entry in series.get("base", [])]
        head = [entry.get("its") for entry in series.get("head", [])]
        rows.append(
            ABRow(
                scenario=record["scenario"],
                cell_id=record["cell_id"],
                verdict=record["verdict"],
                reason=record.get("reason"),
                rounds=len(base),
                residency=record.get("residency", "both"),
                seed=int(record.get("seed", 0)),
                its=its,
                others=tuple(v for v in verdicts if v.metric != "its"),
                chart=rounds_chart(record["cell_id"], base, head) if base else None,
            )
        )
    envs = []
    for label in ("base", "head"):
        side = records[-1].get(label) or {}
        commit = f" ({side['commit'][:12]})" if side.get("commit") else ""
        heading = f"{label}: {side.get('side')}{commit}"
        envs.append(Environment(heading, "", len(records), dict(side.get("env") or {})))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.verdict] = counts.get(row.verdict, 0) + 1
    return ABSection(tuple(rows), environment_table(envs), tuple(sorted(counts.items())))
