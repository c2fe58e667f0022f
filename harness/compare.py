"""Regression comparison: a baseline run against a current run, per cell and metric.

A change gets a verdict only with both an effect and evidence (asv's ``compare`` habit):

- **effect**: the relative change of the cell's figure (the median of the repeats for it/s)
  is larger than the scenario's threshold for that kind of metric (defaults: 5% speed,
  10% memory, 25% load time);
- **evidence**: for speed, the raw repeats (``its_repeats`` / ``denoise_its_repeats``) of the
  two runs differ in the worse (or better) direction with a one-sided p-value below ``alpha``
  (default 0.005). The test is the Mann–Whitney U test where the repeat counts allow a p-value
  that small (5 against 5 repeats do: the smallest exact p is 1/252); with fewer repeats it
  is Welch's t-test on the logarithms of the repeats, which assumes roughly log-normal noise.
  Memory peaks and load time are one value per cell, so for them the threshold alone decides
  (set it above the run-to-run spread of your machine).

Verdicts: ``regression`` / ``improvement`` (both conditions), ``unchanged`` (either missing;
the note says which), ``new`` (only in the current run), ``missing`` (only in the baseline,
or failed now), ``not comparable`` (environment or workload differs; the note says what).
Every row also carries the spread of both sides' repeats (``baseline_cv``, ``current_cv``)
and the scenario's noise limit, so the text and Markdown tables show each figure as the
report does (``7.99 it/s ±0.8%``, ``noisy`` past ``thresholds.noise``).
Everything here returns numbers in a DataFrame; :func:`to_text` and :func:`to_markdown` render
them for the command line (the HTML report lives in ``reports/``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from harness import axes as axis_table
from harness import environment
from harness.errors import UserError
from harness.options import DEFAULT_ALPHA
from harness.results import latest
from harness.scenario import Thresholds

MetricKind = Literal["speed", "memory", "load"]

#: Columns of :attr:`Comparison.table`, in order.
COLUMNS: tuple[str, ...] = (
    "scenario",
    "cell_id",
    "metric",
    "baseline",
    "current",
    "change",
    "verdict",
    "p_value",
    "threshold",
    "note",
    "baseline_cv",
    "current_cv",
    "noise_limit",
)
VERDICTS: tuple[str, ...] = (
    "regression",
    "improvement",
    "unchanged",
    "new",
    "missing",
    "not comparable",
)

#: Cell fields that define the workload (every axis, with the resolution as width and height,
#: and the prompts); a difference makes two records not comparable.
WORKLOAD_FIELDS: tuple[str, ...] = (*axis_table.record_fields(), "prompt", "negative_prompt")


@dataclass(frozen=True)
class Metric:
    """A compared figure: which way is better, its threshold kind, its raw repeats."""

    name: str
    higher_is_better: bool
    kind: MetricKind
    unit: str
    #: Column holding the per-repeat values (statistical evidence), or None for one value.
    repeats: str | None = None


METRICS: tuple[Metric, ...] = (
    Metric("its", True, "speed", "it/s", "its_repeats"),
    Metric("denoise_its", True, "speed", "it/s", "denoise_its_repeats"),
    Metric("cpu_peak_gb", False, "memory", "GB"),
    Metric("gpu_allocated_peak_gb", False, "memory", "GB"),
    Metric("gpu_reserved_peak_gb", False, "memory", "GB"),
    Metric("load_s", False, "load", "s"),
)
METRICS_BY_NAME: dict[str, Metric] = {metric.name: metric for metric in METRICS}


def threshold_for(thresholds: Thresholds, kind: MetricKind) -> float:
    return float(getattr(thresholds, kind))


# -- statistics (pure functions over lists) -------------------------------------------------


def _clean(values: Any) -> list[float]:
    if values is None or (isinstance(values, float) and math.isnan(values)):
        return []
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def smallest_p(n: int, m: int) -> float:
    """The smallest one-sided exact Mann–Whitney p-value for samples of sizes n and m."""
    from scipy.special import comb

    return float(1.0 / comb(n + m, n, exact=True))


def one_sided_p(
    baseline: Sequence[float],
    current: Sequence[float],
    alternative: Literal["less", "greater"],
    alpha: float = DEFAULT_ALPHA,
) -> tuple[float, str]:
    """p-value that ``current`` is ``alternative`` than ``baseline``, and the test used.

    Mann–Whitney U where the sample sizes can reach ``alpha``, else Welch's t-test on logs.
    Returns NaN with fewer than two values on either side.
    """
    from scipy import stats  # here: building the CLI's parsers must not import scipy

    a, b = _clean(baseline), _clean(current)
    if len(a) < 2 or len(b) < 2:
        return math.nan, f"too few repeats ({len(a)} vs {len(b)})"
    if smallest_p(len(a), len(b)) < alpha:
        result = stats.mannwhitneyu(b, a, alternative=alternative, method="auto")
        return float(result.pvalue), "Mann-Whitney U"
    log_a, log_b = np.log(a), np.log(b)
    if np.ptp(log_a) == 0 and np.ptp(log_b) == 0:  # no spread: the direction is certain
        moved = log_b[0] < log_a[0] if alternative == "less" else log_b[0] > log_a[0]
        return (0.0 if moved else 1.0), "Welch t (no spread)"
    result = stats.ttest_ind(log_b, log_a, equal_var=False, alternative=alternative)
    return float(result.pvalue), "Welch t on logs"


@dataclass(frozen=True)
class Verdict:
    verdict: str
    change: float
    p_value: float
    note: str


def judge(
    metric: Metric,
    baseline: float,
    current: float,
    threshold: float,
    *,
    baseline_repeats: Sequence[float] | None = None,
    current_repeats: Sequence[float] | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> Verdict:
    """Verdict for one metric of one cell present, and comparable, in both runs."""
    change = current / baseline - 1.0 if baseline else math.inf if current else 0.0
    worse = change < 0 if metric.higher_is_better else change > 0
    direction = "regression" if worse else "improvement"
    if abs(change) <= threshold:
        return Verdict("unchanged", change, math.nan, f"within ±{threshold:.0%}")
    if metric.repeats is None:
        return Verdict(direction, change, math.nan, "single value: threshold only")
    better_side: Literal["less", "greater"] = "greater" if metric.higher_is_better else "less"
    worse_side: Literal["less", "greater"] = "less" if better_side == "greater" else "greater"
    p_value, test = one_sided_p(
        baseline_repeats or [], current_repeats or [], worse_side if worse else better_side, alpha
    )
    if math.isnan(p_value):
        return Verdict("unchanged", change, p_value, f"{test}: no evidence")
    if p_value < alpha:
        return Verdict(direction, change, p_value, test)
    return Verdict(
        "unchanged", change, p_value, f"{test}: p={p_value:.2g} ≥ {alpha:g}, not significant"
    )


# -- frames --------------------------------------------------------------------------------


def _value(row: Mapping[str, Any] | None, column: str) -> Any:
    if row is None:
        return None
    value = row.get(column)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _number(row: Mapping[str, Any] | None, column: str) -> float | None:
    value = _value(row, column)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def env_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The ``env.*`` columns of a results row as an environment dict (NaN → None)."""
    return {
        key[len("env.") :]: _value(row, key) for key in row if str(key).startswith("env.")
    }


def differences(baseline: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two results rows not comparable: environment and workload fields."""
    found: dict[str, Any] = dict(environment.differences(env_of(baseline), env_of(current)))
    for field in WORKLOAD_FIELDS:
        a, b = _value(baseline, field), _value(current, field)
        if a is not None and b is not None and a != b:
            found[field] = (a, b)
    return found


def describe_differences(found: Mapping[str, Any]) -> str:
    return "; ".join(f"{key}: {a!r} → {b!r}" for key, (a, b) in found.items())


def _latest_rows(frame: pd.DataFrame | None) -> dict[tuple[str, str], dict[str, Any]]:
    if frame is None or frame.empty:
        return {}
    return {(str(record["scenario"]), str(record["cell_id"])): record
            for record in latest(frame).to_dict("records")}


ThresholdsArg = Thresholds | Mapping[str, Thresholds] | None


def _thresholds(thresholds: ThresholdsArg, scenario: str) -> Thresholds:
    if thresholds is None:
        return Thresholds()
    if isinstance(thresholds, Thresholds):
        return thresholds
    return thresholds.get(scenario, Thresholds())


@dataclass(frozen=True)
class Comparison:
    """Per cell and metric verdicts (:data:`COLUMNS`) and the overall exit status."""

    table: pd.DataFrame
    alpha: float = DEFAULT_ALPHA

    @property
    def regressions(self) -> pd.DataFrame:
        return self.table[self.table["verdict"] == "regression"]

    @property
    def exit_status(self) -> int:
        """1 when any metric of any cell regressed, else 0."""
        return 1 if len(self.regressions) else 0

    def counts(self) -> dict[str, int]:
        """Verdict -> number of (cell, metric) rows, in :data:`VERDICTS` order."""
        found = self.table["verdict"].value_counts().to_dict()
        return {verdict: int(found[verdict]) for verdict in VERDICTS if verdict in found}


def compare(
    baseline: pd.DataFrame | None,
    current: pd.DataFrame,
    thresholds: ThresholdsArg = None,
    *,
    alpha: float = DEFAULT_ALPHA,
    metrics: Sequence[Metric] = METRICS,
) -> Comparison:
    """Compare two results frames (:func:`harness.results.load`), newest record per cell.

    ``thresholds`` is one :class:`Thresholds` for every scenario or a mapping from scenario
    name to its thresholds (defaults where a scenario is absent).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    base_rows, current_rows = _latest_rows(baseline), _latest_rows(current)
    keys = list(current_rows) + [key for key in base_rows if key not in current_rows]
    out: list[dict[str, Any]] = []
    for scenario, cell_id in keys:
        limits = _thresholds(thresholds, scenario)
        base, now = base_rows.get((scenario, cell_id)), current_rows.get((scenario, cell_id))
        out.extend(_compare_cell(scenario, cell_id, base, now, limits, alpha, metrics))
    table = pd.DataFrame(out, columns=list(COLUMNS))
    for column in ("baseline", "current", "change", "p_value", "threshold", "baseline_cv",
                   "current_cv", "noise_limit"):
        table[column] = table[column].astype(float)
    return Comparison(table=table, alpha=alpha)


def _status_note(row: Mapping[str, Any] | None, side: str) -> str | None:
    status = _value(row, "status")
    if row is None or status in (None, "ok"):
        return None
    return f"{side}: {status}: {_value(row, 'reason') or ''}".rstrip(": ")


def _compare_cell(
    scenario: str,
    cell_id: str,
    base: dict[str, Any] | None,
    now: dict[str, Any] | None,
    limits: Thresholds,
    alpha: float,
    metrics: Sequence[Metric],
) -> list[dict[str, Any]]:
    base_note, now_note = _status_note(base, "baseline"), _status_note(now, "current")
    usable_base = None if base_note else base
    usable_now = None if now_note else now
    if usable_base is None and usable_now is None:
        return []
    found = (
        differences(usable_base, usable_now)
        if usable_base is not None and usable_now is not None
        else {}
    )
    rows: list[dict[str, Any]] = []
    for metric in metrics:
        a, b = _number(usable_base, metric.name), _number(usable_now, metric.name)
        if a is None and b is None:
            continue
        threshold = threshold_for(limits, metric.kind)
        column = metric.repeats
        row = {
            "scenario": scenario,
            "cell_id": cell_id,
            "metric": metric.name,
            "baseline": a,
            "current": b,
            "change": math.nan,
            "p_value": math.nan,
            "threshold": threshold,
            "baseline_cv": _cv(usable_base, column),
            "current_cv": _cv(usable_now, column),
            "noise_limit": limits.noise,
        }
        if a is not None and b is not None and a != 0:
            row["change"] = b / a - 1.0
        if b is None:
            why = now_note or ("not in the current run" if now is None else "not measured now")
            rows.append({**row, "verdict": "missing", "note": why})
        elif a is None:
            why = base_note or (
                "not in the baseline" if base is None else "not measured in the baseline"
            )
            rows.append({**row, "verdict": "new", "note": why})
        elif found:
            rows.append({**row, "verdict": "not comparable", "note": describe_differences(found)})
        else:
            assert usable_base is not None and usable_now is not None
            verdict = judge(
                metric,
                a,
                b,
                threshold,
                baseline_repeats=_clean(usable_base.get(column)) if column else None,
                current_repeats=_clean(usable_now.get(column)) if column else None,
                alpha=alpha,
            )
            rows.append(
                {
                    **row,
                    "change": verdict.change,
                    "verdict": verdict.verdict,
                    "p_value": verdict.p_value,
                    "note": verdict.note,
                }
            )
    return rows


def _cv(row: Mapping[str, Any] | None, column: str | None) -> float:
    """The spread (coefficient of variation) of a metric's repeats; NaN without two."""
    repeats = _clean(row.get(column)) if row is not None and column else None
    if not isinstance(repeats, list | tuple) or len(repeats) < 2:
        return math.nan
    values = [float(v) for v in repeats]
    mean = statistics.fmean(values)
    return statistics.stdev(values) / mean if mean else math.nan


# -- rendering for the command line and pytest ---------------------------------------------


def _fmt(value: float, unit: str, cv: float = math.nan, noise_limit: float = math.inf) -> str:
    """``7.99 it/s``; with a spread over the repeats ``7.99 it/s ±0.8%``, and ``noisy`` past
    the scenario's noise limit (as the report's tables mark it)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.3g} {unit}"
    if cv is not None and not math.isnan(cv):
        text += f" ±{cv:.1%}" + (" noisy" if cv > noise_limit else "")
    return text


def _sides(row: Mapping[str, Any], unit: str) -> tuple[str, str]:
    limit = row.get("noise_limit")
    limit = math.inf if limit is None or math.isnan(limit) else float(limit)
    return (_fmt(row["baseline"], unit, row.get("baseline_cv", math.nan), limit),
            _fmt(row["current"], unit, row.get("current_cv", math.nan), limit))


def describe(row: Mapping[str, Any]) -> str:
    """One line: ``its: 7.99 it/s → 7.1 it/s (-11.1%, p=0.004, threshold 5%)``."""
    metric = METRICS_BY_NAME.get(str(row["metric"]))
    unit = metric.unit if metric else ""
    parts = [f"{float(row['change']):+.1%}"] if not math.isnan(row["change"]) else []
    if not math.isnan(row["p_value"]):
        parts.append(f"p={row['p_value']:.2g}")
    parts.append(f"threshold {row['threshold']:.0%}")
    baseline, current = _sides(row, unit)
    return f"{row['metric']}: {baseline} → {current} ({', '.join(parts)})"


def summary_line(comparison: Comparison) -> str:
    counts = comparison.counts()
    if not counts:
        return "nothing to compare"
    return ", ".join(f"{count} {verdict}" for verdict, count in counts.items())


def _shown(comparison: Comparison, show_all: bool) -> pd.DataFrame:
    table = comparison.table
    return table if show_all else table[table["verdict"] != "unchanged"]


def to_text(comparison: Comparison, show_all: bool = False) -> str:
    """Plain text: one line per (cell, metric) that is not unchanged, then a summary."""
    lines = [
        f"{row['verdict']:>14}  {row['scenario']}::{row['cell_id']}  {describe(row)}"
        + (f"  [{row['note']}]" if row["note"] else "")
        for row in _shown(comparison, show_all).to_dict("records")
    ]
    lines.append(f"verdict: {summary_line(comparison)}")
    return "\n".join(lines) + "\n"


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(comparison: Comparison, show_all: bool = False) -> str:
    """A Markdown table for a PR comment or a CI job summary."""
    status = "❌ regressions found" if comparison.exit_status else "✅ no regressions"
    lines = [f"**sdbench: {status}** — {summary_line(comparison)}", ""]
    shown = _shown(comparison, show_all)
    if shown.empty:
        return "\n".join(lines) + "\n"
    lines += [
        "| verdict | cell | metric | baseline | current | change | p | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in shown.to_dict("records"):
        metric = METRICS_BY_NAME.get(str(row["metric"]))
        unit = metric.unit if metric else ""
        change = "-" if math.isnan(row["change"]) else f"{row['change']:+.1%}"
        p_value = "-" if math.isnan(row["p_value"]) else f"{row['p_value']:.2g}"
        baseline, current = _sides(row, unit)
        cells = [
            row["verdict"],
            f"`{row['scenario']}::{row['cell_id']}`",
            row["metric"],
            baseline,
            current,
            change,
            p_value,
            row["note"],
        ]
        lines.append("| " + " | ".join(_md_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


# -- command line --------------------------------------------------------------------------


def scenario_thresholds(frame: pd.DataFrame) -> dict[str, Thresholds]:
    """Thresholds of the scenario files named in a results frame, where they still exist."""
    from harness.scenario import load_scenario

    found: dict[str, Thresholds] = {}
    if frame.empty or "scenario_path" not in frame:
        return found
    pairs = frame[["scenario", "scenario_path"]].drop_duplicates().itertuples(index=False)
    for name, path in pairs:
        if isinstance(path, str) and Path(path).is_file():
            try:
                found[str(name)] = load_scenario(path).thresholds
            except UserError:
                continue
    return found


def with_overrides(base: Thresholds, args: argparse.Namespace, prefix: str = "") -> Thresholds:
    """Apply ``--speed-threshold`` style options (see :mod:`harness.options`) to thresholds."""
    from harness.options import threshold_overrides

    overrides = threshold_overrides(args, prefix)
    return base.model_copy(update=overrides) if overrides else base


def _cmd_compare(args: argparse.Namespace) -> int:
    from harness import baseline as baselines
    from harness.options import alpha_option
    from harness.results import load

    current = load(args.current)
    baseline = load(baselines.resolve(args.baseline, baselines.fingerprint_of(current)))
    per_scenario = scenario_thresholds(current)
    names = set(current.get("scenario", pd.Series(dtype=str))) | set(per_scenario)
    limits = {
        str(name): with_overrides(per_scenario.get(str(name), Thresholds()), args)
        for name in names
    }
    comparison = compare(baseline, current, limits, alpha=alpha_option(args))
    render = to_markdown if args.format == "md" else to_text
    sys.stdout.write(render(comparison, show_all=args.all))
    return comparison.exit_status


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``compare BASELINE CURRENT`` to ``python -m harness``."""
    from harness.options import add_threshold_options

    parser = subparsers.add_parser(
        "compare",
        help="compare a run against a baseline; exit status 1 on any regression",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument(
        "baseline",
        type=Path,
        metavar="BASELINE",
        help="baseline: a results dir, a results .jsonl file, or a baselines root "
        "(the baseline of the current run's environment is chosen)",
    )
    parser.add_argument("current", type=Path, metavar="CURRENT", help="current results")
    parser.add_argument("--format", choices=("text", "md"), default="text")
    parser.add_argument("--all", action="store_true", help="also list unchanged metrics")
    add_threshold_options(parser.add_argument, prefix="")
    parser.set_defaults(handler=_cmd_compare)
