"""The doctor's findings in reports: beside the tables whose figures they bear on, and in the
environment section (escaped in HTML)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.doctor import Finding
from harness.results import load
from reports import build_report, render
from reports.doctor import findings, summary
from reports.sample import SAMPLE_ENV, write_sample

FINDINGS = [
    Finding("clocks", "warn", "SM 1410 / 1980 MHz, not locked <script>x</script>",
            "sudo nvidia-smi --lock-gpu-clocks=1980,1980", "gpu", ("speed",)),
    Finding("processes", "fail", "1 other process(es) on the GPU: 77 python (30.0 GB)",
            "stop them", "gpu", ("speed", "memory")),
    Finding("cpu_governor", "warn", "governor powersave on 16 of 16 CPUs",
            "sudo cpupower frequency-set -g performance", "host", ("speed",)),
    Finding("gpus", "warn", "torch and NVML disagree", None, "gpu", ()),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = {**SAMPLE_ENV, "doctor": [f.to_dict() for f in FINDINGS]}
    return write_sample(tmp_path_factory.mktemp("doctor"), env=env, images=False)


def test_tables_note_the_findings_that_bear_on_their_figures(results: Path) -> None:
    report = build_report(load(results))
    notes = {section.table.scenario: section.doctor for section in report.sections}
    # the GPU table: GPU and host findings with an effect on figures, fails first
    assert [(n.status, n.checks) for n in notes["sd15-table"]] == [
        ("fail", ("processes",)), ("warn", ("clocks",)), ("warn", ("cpu_governor",))]
    assert notes["sd15-table"][0].affects_text == "it/s, memory"
    # the CPU scenario measured nothing on a GPU: only the host finding bears on it
    assert [n.checks for n in notes["smoke"]] == [("cpu_governor",)]
    # the environment section lists everything recorded, including findings without effect
    assert [n.checks for n in report.doctor[0].notes] == [
        ("processes",), ("clocks",), ("cpu_governor",), ("gpus",)]
    row = next(r for r in report.environment.rows if r.field == "doctor")
    assert row.values == ("1 fail, 3 warn: clocks, processes, cpu_governor, gpus",)


def test_html_shows_the_note_under_its_table_escaped(results: Path) -> None:
    html = render(load(results), "html")
    table = html.index('data-scenario="sd15-table"')
    note = html.index("bearing on these figures", table)
    assert note < html.index("it/s against batch size", table)
    assert "<script>x</script>" not in html
    assert "not locked &lt;script&gt;x&lt;/script&gt;" in html
    assert html.count('<li class="doctor-fail">') == 2  # the table's note and the environment


def test_markdown_quotes_the_note_under_its_table(results: Path) -> None:
    md = render(load(results), "md")
    section = md[md.index("### sd15-table"):md.index("### smoke")]
    assert "> - **fail** processes: 1 other process(es) on the GPU: 77 python (30.0 GB) → " \
           "stop them (affects it/s, memory)" in section
    assert "&lt;script&gt;" in section and "<script>" not in md
    assert "**Doctor** (when the run started):" in md


def test_results_without_findings(tmp_path: Path) -> None:
    plain = write_sample(tmp_path / "old", images=False, failures=False)  # before the doctor
    report = build_report(load(plain))
    assert report.doctor == () and all(s.doctor == () for s in report.sections)
    assert "doctor" not in {row.field for row in report.environment.rows}
    assert findings(float("nan")) == [] and summary([]) == "no warnings"
