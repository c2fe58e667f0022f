"""Reports: the table computed from results, HTML and Markdown rendering, regression parts.

Fixtures go through the real results format: :func:`reports.sample.write_sample` and the
helpers below write :class:`harness.results.Result` records with ``ResultStore`` and read them
back with ``harness.results.load``.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from harness.results import Result, ResultStore, load
from reports import build_report, build_tables, render
from reports.charts import its_chart, memory_chart, nice_ceiling
from reports.formatting import gb, its, md_cell
from reports.sample import DESIGN_TABLE, SAMPLE_ENV, _cell, metrics_for, sample_verdicts
from reports.sample import write_sample as _write_sample


def write_sample(directory: Path, **options: Any) -> Path:
    return _write_sample(directory, **options)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample(tmp_path_factory.mktemp("results") / "current")


@pytest.fixture(scope="module")
def frame(sample_dir: Path) -> pd.DataFrame:
    return load(sample_dir)


@pytest.fixture(scope="module")
def html(frame: pd.DataFrame, sample_dir: Path) -> str:
    return render(frame, "html", image_root=sample_dir)


class SlotParser(HTMLParser):
    """Collects the results tables: per ``data-cell`` the text of its ``span.value``."""

    def __init__(self) -> None:
        super().__init__()
        self.slots: dict[str, str] = {}
        self.memory: list[str] = []
        self.labels: list[str] = []
        self._cell: str | None = None
        self._in_value = False
        self._in_memory = False
        self._in_label = False
        self._in_results = False
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        classes = (values.get("class") or "").split()
        if tag == "table" and "results" in classes:
            self._in_results = True
        if not self._in_results:
            return
        if tag == "a" and "slot" in classes:
            self._cell = values.get("data-cell")
        elif tag == "td" and "memory" in classes:
            self._in_memory = True
        elif tag == "th" and values.get("scope") == "row":
            self._in_label, self._text = True, ""
        elif tag == "span" and "value" in classes:
            self._in_value, self._text = True, ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_results = False
        elif tag == "span" and self._in_value:
            self._in_value = False
            if self._in_memory:
                self.memory.append(self._text)
            elif self._cell:
                self.slots[self._cell] = self._text
        elif tag == "td":
            self._in_memory = False
        elif tag == "th" and self._in_label:
            self._in_label = False
            self.labels.append(self._text)

    def handle_data(self, data: str) -> None:
        if self._in_value or self._in_label:
            self._text += data


def parse_slots(html: str) -> SlotParser:
    parser = SlotParser()
    parser.feed(html)
    return parser


# --- the table ----------------------------------------------------------------------------


def test_table_has_the_shape_of_design_md(frame: pd.DataFrame) -> None:
    tables = {table.scenario: table for table in build_tables(frame)}
    table = tables["sd15-table"]
    assert table.batches == (1, 2, 4, 8, 16)
    assert table.its_header == "performance it/s (batch 1 / 2 / 4 / 8 / 16)"
    assert table.memory_header == "memory cpu/gpu (GB)"
    assert [row.label for row in table.rows] == [
        "original",
        "original medvram",
        "original lowvram",
        "diffusers",
        "diffusers medvram",
        "diffusers lowvram",
        "diffusers with safetensors",
    ]
    for row, (its_values, cpu, gpu) in zip(table.rows, DESIGN_TABLE.values(), strict=True):
        assert [slot.its for slot in row.slots] == pytest.approx(list(its_values))
        assert (row.cpu_gb, row.gpu_gb) == pytest.approx((cpu, gpu))


def test_html_numbers_equal_the_results_file(sample_dir: Path, html: str) -> None:
    records = [json.loads(line) for line in (sample_dir / "results.jsonl").read_text().splitlines()]
    parsed = parse_slots(html)
    assert len(parsed.slots) == len(records)
    for record in records:
        shown = parsed.slots[record["cell"]["id"]]
        if record["status"] == "ok":
            assert shown == its(record["metrics"]["its"])
            assert float(shown) == round(record["metrics"]["its"], 2)
        else:
            assert shown == record["status"]
    # memory: max over each row's cells, "cpu / gpu"
    ok = [r for r in records if r["status"] == "ok" and r["cell"]["scenario"] == "sd15-table"]
    design_rows = {}
    for record in ok:
        cell = record["cell"]
        key = (cell["backend"], cell["offload"], cell["source"])
        cpu, gpu = record["metrics"]["cpu_peak_gb"], record["metrics"]["gpu_allocated_peak_gb"]
        old = design_rows.get(key, (0.0, 0.0))
        design_rows[key] = (max(old[0], cpu), max(old[1], gpu))
    expected = [f"{gb(cpu)} / {gb(gpu)}" for cpu, gpu in design_rows.values()]
    assert parsed.memory[: len(expected)] == expected
    assert parsed.labels[:3] == ["original", "original medvram", "original lowvram"]


def test_cpu_cells_show_no_gpu_memory_and_failed_slots_show_status(html: str) -> None:
    parsed = parse_slots(html)
    assert parsed.memory[-2:] == ["0.61 / -", "- / -"]
    assert parsed.slots["diffusers-b2"] == "error"
    assert parsed.slots["diffusers-b4"] == "oom"
    assert parsed.slots["diffusers-lowvram-b1"] == "unsupported"


def _store(directory: Path, cells_metrics: list[tuple[Any, dict[str, Any] | None, str]]) -> Path:
    store = ResultStore(directory)
    for cell, metrics, timestamp in cells_metrics:
        if metrics is None:
            result = Result(run_id="r", cell=cell, status="error", reason="boom",
                            env=SAMPLE_ENV, timestamp=timestamp)
        else:
            result = Result(run_id="r", cell=cell, status="ok", metrics=metrics, env=SAMPLE_ENV,
                            timestamp=timestamp)
        store.append(result)
    return directory


def test_rows_never_merge_cells_that_differ_beyond_batch(tmp_path: Path) -> None:
    stamp = "2025-01-01T00:00:00+00:00"
    entries = []
    for dtype in ("fp16", "fp32"):
        for steps in (20, 30):
            for batch in (1, 2):
                cell = _cell("s", f"{dtype}-s{steps}-b{batch}", dtype=dtype, steps=steps,
                             batch=batch)
                entries.append((cell, metrics_for(1.0 + batch, batch, steps, 1.0, 2.0), stamp))
    # same axes as the first fp16 cells but another resolution, and a safetensors source
    entries.append((_cell("s", "wide-b1", dtype="fp16", width=768, height=512), metrics_for(
        2.5, 1, 20, 1.0, 2.0), stamp))
    entries.append((_cell("s", "st-b1", source="safetensors", dtype="fp16"), metrics_for(
        2.6, 1, 20, 1.0, 2.0), stamp))
    table = build_tables(load(_store(tmp_path, entries)))[0]
    labels = [row.label for row in table.rows]
    assert len(labels) == len(set(labels)) == 6
    assert "diffusers (fp16, 512x512, 20 steps)" in labels  # in the axis table's order
    assert "diffusers (fp16, 768x512, 20 steps)" in labels
    assert "diffusers with safetensors (fp16, 512x512, 20 steps)" in labels
    assert "diffusers (fp32, 512x512, 30 steps)" in labels
    for row in table.rows:  # every cell of a row has the row's axes
        assert len({cell_id.rsplit("-b", 1)[0] for cell_id in row.cell_ids}) == 1


def test_latest_record_of_a_cell_wins(tmp_path: Path) -> None:
    cell = _cell("s", "diffusers-b1")
    newer = metrics_for(5.0, 1, 20, 1.0, None)
    older = metrics_for(3.0, 1, 20, 1.0, None)
    directory = _store(tmp_path, [(cell, newer, "2025-02-01T00:00:00+00:00"),
                                  (cell, older, "2025-01-01T00:00:00+00:00")])
    table = build_tables(load(directory))[0]
    assert table.rows[0].slots[0].its == pytest.approx(5.0)
    assert build_report(load(directory)).cells == 1


def test_spread_shown_and_noisy_cells_marked_against_the_scenario_limit(tmp_path: Path) -> None:
    """Identical weights read 38.2, 28.0 and 33.6 it/s: the table says that is noise."""
    stamp = "2025-01-01T00:00:00+00:00"
    steady = metrics_for(33.0, 1, 20, 1.0, None)
    jumpy = metrics_for(33.0, 1, 20, 1.0, None)
    jumpy["its_repeats"] = [38.2, 28.0, 33.6]
    jumpy["its_cv"] = 0.12
    single = {**metrics_for(30.0, 1, 20, 1.0, None), "its_repeats": [30.0], "its_cv": 0.0}
    directory = _store(tmp_path, [
        (_cell("s", "steady-b1", noise_limit=0.1), steady, stamp),
        (_cell("s", "jumpy-b1", source="safetensors", noise_limit=0.1), jumpy, stamp),
        (_cell("s", "single-b1", source="ckpt", noise_limit=0.1), single, stamp),
    ])
    frame = load(directory)
    slots = {row.label: row.slots[0] for row in build_tables(frame)[0].rows}
    assert not slots["diffusers"].noisy and slots["diffusers"].cv == pytest.approx(0.0082)
    assert slots["diffusers with safetensors"].noisy  # CV 12% > the scenario's 10%
    assert slots["diffusers with ckpt"].cv is None and not slots["diffusers with ckpt"].noisy
    md = render(frame, "md")
    assert "| diffusers | 33.00 ±0.8% | 1.0 / - |" in md
    assert "| diffusers with safetensors | 33.00 ±12% noisy | 1.0 / - |" in md
    assert "| diffusers with ckpt | 30.00 | 1.0 / - |" in md
    assert "*noisy*: beyond the noise limit (±10%)" in md
    html = render(frame, "html")
    assert html.count('<span class="noisy-mark">noisy</span>') == 2  # the slot and the legend
    assert "beyond the noise limit ±10%" in html  # the slot's hover text


def test_mfu_column_only_when_a_cell_has_one(tmp_path: Path) -> None:
    stamp = "2025-01-01T00:00:00+00:00"
    gpu = {**metrics_for(9.0, 1, 20, 1.0, 2.0), "mfu": 0.123, "tflops_per_image_step": 1.607}
    directory = _store(tmp_path / "gpu", [(_cell("s", "b1"), gpu, stamp),
                                          (_cell("s", "b2", batch=2), metrics_for(
                                              8.0, 2, 20, 1.0, 2.0), stamp)])
    md = render(load(directory), "md")
    assert "| pipeline | performance it/s (batch 1 / 2) | MFU (batch 1 / 2) |" in md
    assert "| 12.3% / - |" in md
    html = render(load(directory), "html")
    assert "<th>MFU (batch 1 / 2)</th>" in html and "12.3% / -" in html
    assert "TFLOP per image-step" in html and "1.61" in html
    cpu = _store(tmp_path / "cpu", [(_cell("s", "b1"), metrics_for(9.0, 1, 20, 1.0, None),
                                     stamp)])
    assert "MFU" not in render(load(cpu), "md").split("### s", 1)[1].split("\n\n")[1]


def test_scenario_noise_limit_reaches_every_cell(tmp_path: Path) -> None:
    from harness.matrix import expand
    from harness.scenario import load_scenario

    path = tmp_path / "s.yaml"
    path.write_text("name: s\nthresholds: {noise: 0.02}\nmatrix: {backend: [diffusers]}\n")
    cells = expand(load_scenario(path))
    assert {cell.noise_limit for cell in cells} == {0.02}
    plain = tmp_path / "p.yaml"
    plain.write_text("name: s\nmatrix: {backend: [diffusers]}\n")
    moved = expand(load_scenario(plain))[0]
    assert moved.noise_limit == 0.05 and moved.fingerprint() == cells[0].fingerprint()


# --- HTML ---------------------------------------------------------------------------------


def test_user_text_is_escaped(html: str) -> None:
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#39;error&#39;)&lt;/script&gt;" in html  # error message
    assert "&lt;script&gt;alert(&#39;tb&#39;)&lt;/script&gt;" in html  # traceback
    assert "&lt;script&gt;alert(&#39;prompt&#39;)&lt;/script&gt; &amp; friends" in html


def test_html_is_self_contained(html: str) -> None:
    lowered = html.lower()
    for forbidden in ("http://", "https://", 'src="//', "href=\"//", "@import", "url("):
        assert forbidden not in lowered, forbidden
    assert re.findall(r'src="([^"]+)"', html)  # there are images, and all are inline
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]+)"',
                                                                              html))
    assert all(href.startswith(("#", "data:")) for href in re.findall(r'href="([^"]+)"', html))
    assert html.count("<html") == 1 and "<style>" in html


def test_html_has_environment_details_and_errors(html: str) -> None:
    assert "NVIDIA GeForce RTX 3060" in html and "0.42.1" in html
    assert "<details><summary>traceback</summary>" in html
    assert "sequential CPU offload needs an accelerator" in html
    assert 'id="cell-sd15-table--diffusers-nooffload-hub-b4"' in html
    for label in ("step latency", "p10", "p90", "first call", "load", "gpu reserved peak",
                  "finite", "not constant"):
        assert f">{label}<" in html, label
    # it/s per pipeline with a figure (7 + 1), a memory chart per scenario (2)
    assert html.count("<svg") == 7 + 1 + 2
    assert "Δ per cell" not in html  # no baseline, no regression parts


def test_missing_images_are_left_out(frame: pd.DataFrame, tmp_path: Path) -> None:
    html = render(frame, "html", image_root=tmp_path)  # a directory without the images
    assert "<img" not in html
    traversal = frame.copy()
    traversal["image"] = "../../../etc/passwd"
    assert "<img" not in render(traversal, "html", image_root=tmp_path)


def test_empty_results_render() -> None:
    assert "No results." in render(pd.DataFrame(), "html")
    assert "0 cells" in render(pd.DataFrame(), "md")


def test_unknown_format_is_refused(frame: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="fmt must be one of"):
        render(frame, "pdf")


# --- Markdown -----------------------------------------------------------------------------


def test_markdown_table_and_status_line(frame: pd.DataFrame) -> None:
    md = render(frame, "md")
    assert "**39 cells**: 36 ok, 1 unsupported, 1 error, 1 oom" in md
    lines = md.splitlines()
    header = "| pipeline | performance it/s (batch 1 / 2 / 4 / 8 / 16) | memory cpu/gpu (GB) |"
    start = lines.index(header)
    assert lines[start + 1] == "| --- | --- | --- |"
    assert lines[start + 2] == ("| original | 7.99 ±0.8% / 7.93 ±0.8% / 8.83 ±0.8% / 9.14 ±0.8% / 9.20 ±0.8% "
                                  "| 6.7 / 7.2 |")
    assert lines[start + 8] == ("| diffusers with safetensors | 8.90 ±0.8% / 7.30 ±0.8% / "
                                  "8.10 ±0.8% / 8.40 ±0.8% / 7.10 ±0.8% | 5.9 / 9.0 |")
    assert "| diffusers | 12.50 ±0.8% / error / oom | 0.61 / - |" in lines
    assert "| diffusers lowvram | unsupported / - / - | - / - |" in lines


def test_markdown_lists_failing_cells_with_reasons(frame: pd.DataFrame) -> None:
    md = render(frame, "md")
    assert ("- scenarios/smoke.yaml::diffusers-b2 — **error** (ValueError): ValueError: bad "
            "&lt;script&gt;alert('error')&lt;/script&gt; value") in md
    assert "**oom** (OutOfMemoryError): CUDA out of memory" in md
    assert "- scenarios/smoke.yaml::diffusers-lowvram-b1: sequential CPU offload" in md
    assert "<script" not in md


def test_md_cell_keeps_tables_intact() -> None:
    assert md_cell("a | b\nc <i>") == "a \\| b c &lt;i&gt;"


# --- regression ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    env = {**SAMPLE_ENV, "torch": "2.12.0"}
    directory = write_sample(tmp_path_factory.mktemp("baseline"), run_id="base", scale=1.03,
                             env=env, timestamp="2024-12-01T00:00:00+00:00", images=False)
    return load(directory)


@pytest.fixture(scope="module")
def regression_html(frame: pd.DataFrame, baseline: pd.DataFrame) -> str:
    return render(frame, "html", baseline=baseline, verdicts=sample_verdicts())


def test_regression_summary_at_the_top(regression_html: str) -> None:
    summary = regression_html.index('id="verdict"')
    assert summary < regression_html.index('id="scenario-sd15-table"')
    assert '<div class="banner fail">' in regression_html
    assert "2 regressions against the baseline" in regression_html
    for chip in ('verdict-regression">2 regression', 'verdict-improvement">1 improvement',
                 'verdict-not-comparable">1 not comparable', 'verdict-missing">1 missing',
                 'verdict-new">1 new', 'verdict-unchanged">1 unchanged'):
        assert chip in regression_html, chip
    assert "gpu_name differs: &lt;b&gt;A100&lt;/b&gt; vs RTX 3060" in regression_html


def test_table_slots_carry_delta_and_verdict_colour(regression_html: str) -> None:
    slot = re.search(r'<a class="slot status-ok verdict-regression"[^>]*'
                     r'data-cell="diffusers-nooffload-hub-b4"[^>]*>(.*?)</a>', regression_html)
    assert slot is not None
    assert '<span class="value">8.20</span><span class="spread">±0.8%</span><span class="delta">-12.2%</span>' == slot.group(1)
    assert 'class="slot status-ok verdict-improvement"' in regression_html
    memory = re.search(r'<td class="memory verdict-regression"[^>]*>(.*?)</td>', regression_html,
                       re.S)
    assert memory is not None and "memory gpu +13.9%" in memory.group(1)
    assert "baseline 4.3 / 9.0" in regression_html  # baseline memory beside the current one


def test_charts_show_baseline_dashed_and_current_solid(frame: pd.DataFrame,
                                                       baseline: pd.DataFrame) -> None:
    table = build_tables(frame, baseline=baseline)[0]
    chart = its_chart(table, table.rows[0])
    assert [line.css for line in chart.lines] == ["series-baseline", "series-current"]
    assert len(chart.lines[1].points) == 5
    base_y = [p.y for p in chart.lines[0].points]
    current_y = [p.y for p in chart.lines[1].points]
    assert all(b < c for b, c in zip(base_y, current_y, strict=True))  # baseline 3% faster
    assert [tick.label for tick in chart.x_ticks] == ["1", "2", "4", "8", "16"]
    bars = memory_chart(table)
    assert bars is not None
    assert {bar.css for bar in bars.bars} == {"bar-cpu", "bar-cpu bar-baseline", "bar-gpu",
                                              "bar-gpu bar-baseline"}
    assert max(bar.x + bar.width for bar in bars.bars) <= bars.right


def test_environments_side_by_side_with_differences_marked(regression_html: str) -> None:
    env = regression_html[regression_html.index('id="environment"'):]
    assert "<th>baseline</th><th>current</th>" in env
    torch_row = re.search(r'<tr class="differs">\s*<th scope="row">torch</th>(.*?)</tr>', env,
                          re.S)
    assert torch_row is not None
    assert "2.12.0" in torch_row.group(1) and "2.13.0" in torch_row.group(1)
    assert "≠ differs" in torch_row.group(1)
    assert '<tr class="differs">\n<th scope="row">gpu_name</th>' not in env


def test_markdown_verdict_for_a_pr_comment(frame: pd.DataFrame, baseline: pd.DataFrame) -> None:
    md = render(frame, "md", baseline=baseline, verdicts=sample_verdicts())
    assert "### Verdict: 2 regressions against the baseline" in md
    assert "regression: 2 · improvement: 1 · unchanged: 1" in md
    assert ("| sd15-table::diffusers-nooffload-hub-b4 | it/s | 8.20 | 7.20 | -12.2% | 0.008 "
            "| 5.0% |  |") in md
    assert "| sd15-table::diffusers-medvram-hub-b2 | memory gpu | 7.2 GB | 8.2 GB | +13.9%" in md
    assert ("| diffusers | 9.00 ±0.8% / 7.40 ±0.8% / 8.20 ±0.8% ▼-12.2% / 8.40 ±0.8% / 7.00 ±0.8% "
            "| 4.3 / 9.0 |") in md
    assert "| torch ≠ | 2.12.0 | 2.13.0 |" in md


def test_no_regression_gives_a_passing_banner(frame: pd.DataFrame,
                                              baseline: pd.DataFrame) -> None:
    verdicts = sample_verdicts()
    verdicts = verdicts[verdicts["verdict"] != "regression"]
    html = render(frame, "html", baseline=baseline, verdicts=verdicts)
    assert '<div class="banner pass">' in html
    assert "no regressions against the baseline" in html


def test_verdicts_outside_the_contract_are_refused(frame: pd.DataFrame) -> None:
    bad = sample_verdicts().assign(verdict="worse")
    with pytest.raises(ValueError, match="verdict must be one of"):
        render(frame, "html", verdicts=bad)


# --- formatting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [(7.994, "7.99"), (9.2, "9.20"), (0.0456, "0.046"), (None, "-"),
                            (float("nan"), "-")],
)
def test_its_formatting(value: float | None, expected: str) -> None:
    assert its(value) == expected


def test_gb_formatting_and_nice_axis() -> None:
    assert (gb(6.74), gb(0.434), gb(None)) == ("6.7", "0.43", "-")
    assert [nice_ceiling(v) for v in (0.0, 0.7, 9.2, 10.2, 13.0)] == [1.0, 0.8, 10.0, 12.0,
                                                                       16.0]


def test_slot_dataclass_is_frozen(frame: pd.DataFrame) -> None:
    slot = build_tables(frame)[0].rows[0].slots[0]
    assert replace(slot, its=1.0).its == 1.0
    with pytest.raises(AttributeError):
        slot.its = 2.0  # type: ignore[misc]


def test_baseline_alone_uses_harness_compare(frame: pd.DataFrame, baseline: pd.DataFrame) -> None:
    pytest.importorskip("harness.compare")
    html = render(frame, "html", baseline=baseline)
    assert 'id="verdict"' in html and "comparisons over 36 cells" in html
    assert "verdict-not-comparable" in html  # the baseline ran another torch


def test_no_batch_charts_without_a_batch_sweep() -> None:
    from reports.charts import its_charts
    from reports.table import Table

    assert its_charts(Table(scenario="s", batches=(1,), rows=())) == []
