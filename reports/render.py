"""Render a results frame as one self-contained HTML page or as GitHub Markdown.

:func:`build_report` computes everything the page shows into a :class:`Report` (tables,
cell details, failures, environments, charts, verdicts); :func:`render` hands it to a jinja2
template. Templates only place values and call the formatting filters of
:mod:`reports.formatting`; they do no arithmetic (STYLE.md habit 9).

The conformance matrix and the parity table come from :mod:`reports.conformance`; both
appear only when the results carry conformance data.

The HTML is one file with no external resources: inline CSS, inline SVG charts, preview
images as ``data:`` URIs, no scripts, no fonts, no links out. Everything that comes from
users or backends (prompts, error messages, tracebacks, labels) is escaped by jinja2's
autoescaping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from harness.vocabulary import FAILED_STATUSES
from reports import formatting
from reports.ab import ABSection, build_ab
from reports.cells import (
    CellDetail,
    ImageResolver,
    build_details,
    image_resolver,
    status_counts,
)
from reports.charts import BarChart, LineChart, its_charts, memory_chart
from reports.conformance import Conformance, Outcome, ParityRow, build_conformance
from reports.doctor import DoctorNote, EnvDoctor, environment_notes, table_notes
from reports.environment import EnvTable, environment_table, environments
from reports.table import Row, Slot, Table, build_tables, latest_records
from reports.verdicts import VerdictIndex, VerdictSummary, css_class, from_frame, summarize

FORMATS: tuple[str, ...] = ("html", "md")
_TEMPLATES = {"html": "report.html.j2", "md": "report.md.j2"}


@dataclass(frozen=True)
class ScenarioSection:
    """One scenario: its table and its charts."""

    table: Table
    its_charts: tuple[LineChart, ...]
    memory_chart: BarChart | None
    #: The doctor's findings that bear on this table's figures.
    doctor: tuple[DoctorNote, ...] = ()

    @property
    def anchor(self) -> str:
        return "scenario-" + "".join(c if c.isalnum() or c in "-_" else "_"
                                     for c in self.table.scenario)


@dataclass(frozen=True)
class Report:
    """Everything a report shows, computed; the templates only lay it out."""

    title: str
    runs: tuple[str, ...]
    first_timestamp: str | None
    last_timestamp: str | None
    cells: int
    status_counts: tuple[tuple[str, int], ...]
    sections: tuple[ScenarioSection, ...]
    details: tuple[CellDetail, ...]
    environment: EnvTable
    has_baseline: bool = False
    baseline_runs: tuple[str, ...] = ()
    summary: VerdictSummary | None = None
    anchors: dict[tuple[str, str], str] = field(default_factory=dict)
    #: The conformance matrices and the parity table (empty without conformance data).
    conformance: Conformance = field(default_factory=Conformance)
    #: An A/B run's verdicts (``python -m harness ab``), or None.
    ab: ABSection | None = None
    #: The doctor's findings recorded in each environment.
    doctor: tuple[EnvDoctor, ...] = ()

    @property
    def failures(self) -> tuple[CellDetail, ...]:
        return tuple(d for d in self.details if d.failed)

    @property
    def unsupported(self) -> tuple[CellDetail, ...]:
        return tuple(d for d in self.details if d.status == "unsupported")

    def anchor(self, scenario: str, cell_id: str | None) -> str | None:
        """The HTML id of a cell's details, for links from the table."""
        return self.anchors.get((scenario, cell_id)) if cell_id else None


def _runs(frame: pd.DataFrame | None) -> tuple[str, ...]:
    if frame is None or frame.empty or "run_id" not in frame.columns:
        return ()
    return tuple(dict.fromkeys(str(run) for run in frame["run_id"].dropna()))


def _timestamps(frame: pd.DataFrame) -> tuple[str | None, str | None]:
    if frame.empty or "timestamp" not in frame.columns:
        return None, None
    stamps = sorted(str(t) for t in frame["timestamp"].dropna() if str(t))
    return (stamps[0], stamps[-1]) if stamps else (None, None)


def build_report(
    frame: pd.DataFrame,
    *,
    baseline: pd.DataFrame | None = None,
    verdicts: pd.DataFrame | None = None,
    image_root: Path | Sequence[Path] | None = None,
    resolve_image: ImageResolver | None = None,
    title: str | None = None,
    ab: Sequence[dict[str, Any]] = (),
) -> Report:
    """Compute a :class:`Report` from a results frame (``harness.results.load``).

    ``ab``: the A/B records of an ``ab`` run (``harness.ab.load_ab``); the frame then holds
    that run's rounds, of which the tables show the head side's.

    ``baseline`` (a results frame) adds baseline figures to the tables and charts and its
    environment beside the current one; ``verdicts`` (``harness.compare.compare``'s frame)
    adds the verdict summary and colours the table. ``image_root`` is the results
    directory (or directories) that the ``image`` column is relative to; ``resolve_image``
    replaces that lookup entirely.
    """
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame must be a pandas DataFrame, got {type(frame).__name__}")
    if ab and "ab_side" in frame.columns:
        frame = frame[frame["ab_side"] == "head"]
    verdict_list = from_frame(verdicts)
    index = VerdictIndex(verdict_list) if verdicts is not None else None
    tables = build_tables(frame, baseline=baseline, verdicts=index)
    records = latest_records(frame).to_dict(orient="records") if not frame.empty else []
    sections = tuple(
        ScenarioSection(
            table,
            tuple(its_charts(table)),
            memory_chart(table),
            table_notes(r for r in records if str(r.get("scenario")) == table.scenario),
        )
        for table in tables
    )
    resolve = resolve_image or image_resolver(image_root)
    details = build_details(frame, resolve)
    envs = environments(baseline, "baseline") + environments(frame, "current") \
        if baseline is not None else environments(frame)
    first, last = _timestamps(frame)
    scenarios = [table.scenario for table in tables]
    return Report(
        title=title or ("sdbench report" + (f": {', '.join(scenarios)}" if scenarios else "")),
        runs=_runs(frame),
        first_timestamp=first,
        last_timestamp=last,
        cells=len(latest_records(frame)) if not frame.empty else 0,
        status_counts=status_counts(details),
        sections=sections,
        details=tuple(details),
        environment=environment_table(envs),
        has_baseline=baseline is not None,
        baseline_runs=_runs(baseline),
        summary=summarize(verdict_list) if verdicts is not None else None,
        anchors={(d.scenario, d.cell_id): d.anchor for d in details},
        conformance=build_conformance(frame, resolve),
        ab=build_ab(ab),
        doctor=environment_notes(envs),
    )


# --- filters: formatting only -------------------------------------------------------------


def slot_text(slot: Slot) -> str:
    """A table slot's figure: it/s when ok, else the status; ``-`` for no cell."""
    if slot.status is None:
        return formatting.MISSING
    return formatting.its(slot.its) if slot.ok else slot.status


def slot_spread(slot: Slot) -> str:
    """``±3.4%`` (its spread over the repeats), ``±12% noisy``; empty without a spread."""
    if not slot.ok or slot.cv is None:
        return ""
    text = formatting.spread(slot.cv)
    return f"{text} {formatting.NOISY}" if slot.noisy else text


def slot_title(slot: Slot) -> str:
    """The hover text of a slot: cell id, reason, spread, baseline and verdict."""
    parts = [slot.cell_id or f"no cell at batch {slot.batch}"]
    if slot.reason:
        parts.append(slot.reason)
    if slot.ok and slot.cv is not None:
        parts.append(f"spread {formatting.spread(slot.cv)} over the repeats (CV)"
                     + (f", beyond the noise limit {formatting.spread(slot.noise_limit)}"
                        if slot.noisy else ""))
    if slot.baseline_its is not None:
        parts.append(f"baseline {formatting.its(slot.baseline_its)} it/s")
    if slot.verdict is not None:
        verdict = slot.verdict
        parts.append(f"{verdict.verdict} {formatting.change(verdict.change)}"
                     + (f" (p={formatting.p_value(verdict.p_value)})"
                        if verdict.p_value is not None else ""))
        if verdict.note:
            parts.append(verdict.note)
    return " — ".join(parts)


def md_slot(slot: Slot) -> str:
    """A slot for Markdown: the figure with its spread, plus the change when it is a verdict
    worth seeing."""
    text = slot_text(slot)
    if spread := slot_spread(slot):
        text += f" {spread}"
    verdict = slot.verdict
    if verdict is not None and verdict.verdict in ("regression", "improvement"):
        arrow = "▼" if verdict.verdict == "regression" else "▲"
        text += f" {arrow}{formatting.change(verdict.change)}"
    return text


def md_memory(row: Row) -> str:
    """A row's memory for Markdown, with its most severe memory change when notable."""
    text = f"{formatting.gb(row.cpu_gb)} / {formatting.gb(row.gpu_gb)}"
    verdict = row.memory_verdict
    if verdict is not None and verdict.verdict in ("regression", "improvement"):
        arrow = "▼" if verdict.verdict == "regression" else "▲"
        text += f" {arrow}{verdict.metric_label} {formatting.change(verdict.change)}"
    return text


def outcome_text(outcome: Outcome) -> str:
    """A matrix slot's word: ``pass``, ``fail``, ``differs``, ``unsupported``, … ``-``."""
    return formatting.MISSING if outcome.status == "none" else outcome.status


def outcome_note(outcome: Outcome) -> str | None:
    """What follows the word in parentheses: the metric of a difference (and of a parity
    pass), the reason of a failure or of an unsupported cell, long-prompt behaviour."""
    metric = None
    if outcome.psnr_db is not None:
        metric = f"PSNR {formatting.psnr(outcome.psnr_db)}, rel. error " \
                 f"{formatting.rel_error(outcome.value)}"
    elif outcome.value is not None:
        metric = f"rel. error {formatting.rel_error(outcome.value)}"
    if outcome.status == "pass":
        if outcome.psnr_db is not None:
            return f"PSNR {formatting.psnr(outcome.psnr_db)}"
        return {"keeps": "keeps long prompts", "truncates": "truncates at 77 tokens"}.get(
            outcome.behaviour or "")
    if outcome.status == "differs":
        return metric or (formatting.short(outcome.reason) if outcome.reason else None)
    if outcome.status in ("fail", "unsupported") and outcome.reason:
        failed = outcome.recorded in FAILED_STATUSES and outcome.recorded != "error"
        prefix = f"{outcome.recorded}: " if failed else ""
        return prefix + formatting.short(outcome.reason)
    return None


def outcome_title(outcome: Outcome) -> str:
    """The hover text of a slot: the cell, the recorded status, the full detail."""
    parts = [outcome.cell_id or "no cell"]
    if outcome.recorded and outcome.recorded != outcome.status:
        parts.append(f"recorded as {outcome.recorded}")
    if outcome.reason:
        parts.append(outcome.reason)
    return " — ".join(parts)


def md_outcome(outcome: Outcome) -> str:
    """A slot for Markdown: ``fail (reason)``, ``differs (PSNR 19.7 dB, …)``."""
    note = outcome_note(outcome)
    return outcome_text(outcome) + (f" ({note})" if note else "")


def md_doctor(note: DoctorNote) -> str:
    """A doctor finding for Markdown: ``**warn** clocks: … → … (affects it/s)``."""
    text = f"**{note.status}** {', '.join(note.checks)}: {note.detail}"
    if note.advice:
        text += f" → {note.advice}"
    if note.affects:
        text += f" (affects {note.affects_text})"
    return formatting.md_cell(text)


def parity_limits(row: ParityRow) -> str:
    """``≤ 0.001, ≥ 40.0 dB``: the dtype's parity limits, ``-`` when unknown."""
    if row.max_rel_err is None or row.min_psnr_db is None:
        return formatting.MISSING
    return f"≤ {formatting.rel_error(row.max_rel_err)}, ≥ {formatting.psnr(row.min_psnr_db)}"


def _environment() -> Environment:
    escape = select_autoescape(
        enabled_extensions=("html", "html.j2", "svg.j2"), default_for_string=True, default=False
    )
    env = Environment(autoescape=escape,  # everything rendered into HTML is escaped
        loader=PackageLoader("reports", "templates"),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        fmt=formatting.fmt,
        its=formatting.its,
        gb=formatting.gb,
        change=formatting.change,
        p=formatting.p_value,
        metric=formatting.metric,
        md=formatting.md_cell,
        slot_text=slot_text,
        slot_title=slot_title,
        slot_spread=slot_spread,
        md_slot=md_slot,
        md_memory=md_memory,
        verdict_class=css_class,
        short=formatting.short,
        outcome_text=outcome_text,
        outcome_note=outcome_note,
        outcome_title=outcome_title,
        md_outcome=md_outcome,
        parity_limits=parity_limits,
        md_doctor=md_doctor,
    )
    env.globals["NOISY"] = formatting.NOISY
    return env


_ENV: Environment | None = None


def _jinja() -> Environment:
    global _ENV
    if _ENV is None:
        _ENV = _environment()
    return _ENV


def render(
    frame: pd.DataFrame,
    fmt: str = "html",
    *,
    baseline: pd.DataFrame | None = None,
    verdicts: pd.DataFrame | Any | None = None,
    image_root: Path | Sequence[Path] | None = None,
    title: str | None = None,
    ab: Sequence[dict[str, Any]] = (),
) -> str:
    """Render results as ``html`` (one self-contained page) or ``md`` (GitHub Markdown).

    ``verdicts`` is ``harness.compare.compare``'s result (a ``Comparison``, whose ``table``
    is used) or its verdict DataFrame. With ``baseline`` and no ``verdicts``, they are
    computed with ``harness.compare.compare`` and the scenarios' thresholds.
    ``image_root``: the results directory (or directories) the ``image`` column is
    relative to; without it no preview is embedded.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if baseline is not None and verdicts is None:
        # lazy: only a regression report needs it
        from harness.compare import compare, scenario_thresholds

        verdicts = compare(baseline, frame, scenario_thresholds(frame))
    if verdicts is not None and not isinstance(verdicts, pd.DataFrame):
        verdicts = verdicts.table  # a harness.compare.Comparison
    report = build_report(
        frame, baseline=baseline, verdicts=verdicts, image_root=image_root, title=title, ab=ab
    )
    return _jinja().get_template(_TEMPLATES[fmt]).render(report=report)
