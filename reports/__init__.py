"""sdbench reports: results (and regression verdicts) rendered as HTML or Markdown.

``render(frame, "html")`` gives one self-contained HTML page: the environment, the table of
DESIGN.md per scenario, charts, errors and per-cell details; ``render(frame, "md")`` the same
table as GitHub Markdown. With ``baseline=`` and ``verdicts=`` (``harness.compare``'s frame)
both gain the regression verdict. Results with conformance checks add the parity table and
the conformance matrix. ``docs/reports.md`` describes what each part shows.
"""

from reports.cells import CellDetail, build_details, image_resolver
from reports.charts import BarChart, LineChart, its_charts, memory_chart
from reports.conformance import (
    Conformance,
    ConformanceMatrix,
    Outcome,
    ParityRow,
    build_conformance,
)
from reports.render import FORMATS, Report, build_report, render
from reports.table import Row, Slot, Table, build_tables, latest_records
from reports.verdicts import VERDICTS, Verdict, VerdictSummary

__all__ = [
    "FORMATS",
    "VERDICTS",
    "BarChart",
    "CellDetail",
    "Conformance",
    "ConformanceMatrix",
    "LineChart",
    "Outcome",
    "ParityRow",
    "Report",
    "Row",
    "Slot",
    "Table",
    "Verdict",
    "VerdictSummary",
    "build_conformance",
    "build_details",
    "build_report",
    "build_tables",
    "image_resolver",
    "its_charts",
    "latest_records",
    "memory_chart",
    "render",
]
