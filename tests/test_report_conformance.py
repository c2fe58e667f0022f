"""Reports: the parity table and the conformance matrix.

Fixtures go through the real results format: :func:`reports.sample.write_sample` with
``conformance=True`` writes :data:`reports.sample.CONFORMANCE_CELLS` with ``ResultStore``,
and ``harness.results.load`` reads them back.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from harness.results import load
from reports import render
from reports.cells import image_resolver
from reports.conformance import (
    CHECK_LABELS,
    ConformanceMatrix,
    Outcome,
    build_conformance,
    feature_label,
)
from reports.formatting import PSNR_IDENTICAL_DB, lora_label, psnr, rel_error
from reports.render import md_outcome
from reports.sample import CONFORMANCE_CELLS, write_sample


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample(tmp_path_factory.mktemp("conformance") / "current", conformance=True)


@pytest.fixture(scope="module")
def frame(sample_dir: Path) -> pd.DataFrame:
    return load(sample_dir)


@pytest.fixture(scope="module")
def html(frame: pd.DataFrame, sample_dir: Path) -> str:
    return render(frame, "html", image_root=sample_dir)


@pytest.fixture(scope="module")
def matrix(frame: pd.DataFrame, sample_dir: Path) -> ConformanceMatrix:
    conformance = build_conformance(frame, image_resolver(sample_dir))
    assert [m.scenario for m in conformance.matrices] == ["conformance"]  # not sd15-table
    return conformance.matrices[0]


def _records(sample_dir: Path) -> list[dict[str, Any]]:
    lines = (sample_dir / "results.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["cell"]["scenario"] == "conformance"]


def _slot(matrix: ConformanceMatrix, feature: str, check: str, column: str) -> Outcome:
    index = matrix.columns.index(column)
    for label, row in matrix.rows:
        if label == feature and row.check == check:
            return row.outcomes[index]
    raise AssertionError(f"no row {feature!r} / {check!r}")


# --- the parity table ---------------------------------------------------------------------


class ParityParser(HTMLParser):
    """Per ``table.parity`` row (``data-cell``): the text of each ``td`` by its class."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.images: dict[str, int] = {}
        self._in_table = False
        self._cell: str | None = None
        self._column: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        classes = (values.get("class") or "").split()
        if tag == "table" and "parity" in classes:
            self._in_table = True
        elif self._in_table and tag == "tr" and values.get("data-cell"):
            self._cell = values["data-cell"]
            self.rows[self._cell or ""] = {}
            self.images[self._cell or ""] = 0
        elif self._cell and tag == "td":
            self._column = next((c for c in ("rel-err", "psnr", "outcome") if c in classes),
                                None)
            if self._column:
                self.rows[self._cell][self._column] = ""
        elif self._cell and tag == "img":
            self.images[self._cell] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_table, self._cell = False, None
        elif tag == "td":
            self._column = None

    def handle_data(self, data: str) -> None:
        if self._cell and self._column:
            self.rows[self._cell][self._column] += data.strip()


def test_parity_section_numbers_equal_the_records(sample_dir: Path, html: str) -> None:
    parser = ParityParser()
    parser.feed(html)
    parity = [r for r in _records(sample_dir) if "parity_ref" in r["metrics"]]
    assert len(parity) == 3 and set(parser.rows) == {r["cell"]["id"] for r in parity}
    for record in parity:
        shown, metrics = parser.rows[record["cell"]["id"]], record["metrics"]
        assert shown["rel-err"] == rel_error(metrics["parity_latent_rel_err"])
        assert shown["psnr"] == f"{metrics['parity_psnr_db']:.1f} dB"
        assert shown["outcome"] == metrics["parity_status"]
        assert parser.images[record["cell"]["id"]] == 2  # both backends, side by side
    assert parser.rows["diffusers-txt2img-dpmpp_2m"] == {"rel-err": "0.709", "psnr": "19.7 dB",
                                                          "outcome": "differs"}


def test_parity_rows_carry_the_pair_limits_and_images(frame: pd.DataFrame,
                                                      sample_dir: Path) -> None:
    rows = build_conformance(frame, image_resolver(sample_dir)).parity
    row = next(r for r in rows if r.cell_id == "diffusers-txt2img-euler")
    assert (row.backend, row.ref_backend, row.ref_cell_id) == ("diffusers", "original",
                                                               "original-txt2img-euler")
    assert (row.sampler, row.dtype, row.status) == ("euler", "fp32", "pass")
    assert row.latent_rel_err == pytest.approx(3.0979e-06)
    assert row.psnr_db == pytest.approx(86.0153)
    assert row.feature == "txt2img · sampler euler"
    from harness.conformance import PARITY_THRESHOLDS

    assert (row.max_rel_err, row.min_psnr_db) == PARITY_THRESHOLDS["fp32"]
    assert row.image and row.ref_image and row.image != row.ref_image
    assert row.image.startswith("data:image/png;base64,")


# --- the matrix ---------------------------------------------------------------------------


def test_matrix_columns_rows_and_statuses(matrix: ConformanceMatrix) -> None:
    assert matrix.columns == ("original", "diffusers")
    assert [group.label for group in matrix.groups] == [
        "txt2img · sampler euler",
        "txt2img · sampler dpmpp_2m",
        "txt2img · sampler euler · LoRA style@0.5+detail@1",
        "txt2img · sampler euler · embedding sbstyle",
        "img2img · sampler euler · strength 0.5",
        "inpaint (9-channel) · sampler euler · strength 0.75",
    ]
    euler = "txt2img · sampler euler"
    assert [row.label for row in matrix.groups[0].rows] == [
        "runs", "same seed twice", "long prompt", "parity with the other backend"]
    expected = {
        (euler, "run", "original"): "pass",
        (euler, "parity", "original"): "reference",
        (euler, "parity", "diffusers"): "pass",
        ("txt2img · sampler dpmpp_2m", "parity", "diffusers"): "differs",
        ("txt2img · sampler euler · LoRA style@0.5+detail@1", "lora_monotonic", "diffusers"):
            "fail",
        ("txt2img · sampler euler · LoRA style@0.5+detail@1", "lora_merged", "diffusers"):
            "differs",
        ("txt2img · sampler euler · embedding sbstyle", "embedding_by_hand", "original"): "fail",
        ("txt2img · sampler euler · embedding sbstyle", "run", "diffusers"): "unsupported",
        ("txt2img · sampler euler · embedding sbstyle", "embedding_effect", "diffusers"):
            "not run",
        ("img2img · sampler euler · strength 0.5", "run", "original"): "unsupported",
        ("img2img · sampler euler · strength 0.5", "img2img_strength0", "diffusers"): "differs",
        ("inpaint (9-channel) · sampler euler · strength 0.75", "run", "original"): "fail",
        ("inpaint (9-channel) · sampler euler · strength 0.75", "inpaint_keeps_unmasked",
         "diffusers"): "pass",
    }
    for (feature, check, column), status in expected.items():
        assert _slot(matrix, feature, check, column).status == status, (feature, check, column)
    assert dict(matrix.counts) == {"pass": 24, "fail": 3, "differs": 3, "unsupported": 2}


def test_every_check_of_every_cell_is_in_the_matrix(matrix: ConformanceMatrix,
                                                    sample_dir: Path) -> None:
    shown = {(o.cell_id, row.check): o for _, row in matrix.rows for o in row.outcomes}
    for record in _records(sample_dir):
        cell_id = record["cell"]["id"]
        assert (cell_id, "run") in shown
        for name, check in record["metrics"].get("check_results", {}).items():
            outcome = shown[(cell_id, name)]
            assert outcome.recorded == check["status"]
            assert outcome.reason == check["detail"]


def test_slot_text_says_reason_metric_and_behaviour(matrix: ConformanceMatrix) -> None:
    euler, lora = "txt2img · sampler euler", "txt2img · sampler euler · LoRA style@0.5+detail@1"
    assert md_outcome(_slot(matrix, euler, "parity", "diffusers")) == "pass (PSNR 86.0 dB)"
    assert md_outcome(_slot(matrix, "txt2img · sampler dpmpp_2m", "parity", "diffusers")) \
        == "differs (PSNR 19.7 dB, rel. error 0.709)"
    assert md_outcome(_slot(matrix, lora, "lora_merged", "diffusers")) \
        == "differs (rel. error 0.618)"
    assert md_outcome(_slot(matrix, euler, "long_prompt", "diffusers")) \
        == "pass (truncates at 77 tokens)"
    assert md_outcome(_slot(matrix, "img2img · sampler euler · strength 0.5", "run",
                            "original")).startswith("unsupported (img2img is <b>not</b>")
    assert md_outcome(_slot(matrix, lora, "lora_monotonic", "diffusers")).startswith(
        "fail (distance from no LoRA")
    parity = _slot(matrix, euler, "parity", "diffusers")
    assert [t.backend for t in parity.thumbnails] == ["original", "diffusers"]
    assert all(t.image and t.image.startswith("data:image/png") for t in parity.thumbnails)


def test_long_prompt_statement_names_the_truncating_backend(matrix: ConformanceMatrix) -> None:
    assert matrix.long_prompt_statement == (
        "Long prompts: diffusers truncates prompts at 77 tokens; original keeps long prompts "
        "(tokens past 77 change the output).")


def test_html_sections_are_placed_after_the_tables_and_escaped(html: str) -> None:
    assert html.index('id="scenario-conformance"') < html.index('id="parity"') \
        < html.index('id="conformance"') < html.index('id="environment"')
    assert '<a href="#parity">parity</a>' in html and '<a href="#conformance">' in html
    assert "<script" not in html.lower()
    assert "<b>not</b>" not in html and "<i>add_tokens</i>" not in html
    assert "&lt;script&gt;alert(&#39;unsupported&#39;)&lt;/script&gt;" in html
    assert "&lt;script&gt;alert(&#39;mask&#39;)&lt;/script&gt;" in html
    assert "&lt;script&gt;alert(&#39;check&#39;)&lt;/script&gt;" in html
    matrix = html[html.index('<table class="conformance"'):]
    matrix = matrix[: matrix.index("</table>")]
    assert matrix.count('rowspan="4"') == 1  # txt2img · sampler euler: runs + 3 checks
    assert len(re.findall(r'<td class="outcome outcome-fail"', matrix)) == 3
    assert len(re.findall(r'<td class="outcome outcome-differs"', matrix)) == 3
    assert "<details><summary>" in matrix  # reasons unfold
    assert matrix.count("<img ") == 6  # three parity slots, two thumbnails each
    assert "Long prompts: diffusers truncates prompts at 77 tokens" in html


def test_markdown_matrix_and_parity_table(frame: pd.DataFrame) -> None:
    md = render(frame, "md")
    lines = md.splitlines()
    start = lines.index("| feature | check | original | diffusers | ")
    assert lines[start + 1] == "| --- | --- | --- | --- | "
    assert lines[start + 2] == "| txt2img · sampler euler | runs | pass | pass | "
    assert lines[start + 3] == "|  | same seed twice | pass | pass | "
    assert ("|  | parity with the other backend | reference | differs (PSNR 19.7 dB, "
            "rel. error 0.709) | ") in lines
    assert ("| img2img · sampler euler · strength 0.5 | runs | unsupported (img2img is "
            "&lt;b&gt;not&lt;/b&gt; implemented &lt;script&gt;alert('unsupported')"
            "&lt;/script&gt;) | pass | ") in lines
    assert "pass: 24 · fail: 3 · differs: 3 · unsupported: 2" in lines
    assert ("| conformance | txt2img · sampler dpmpp_2m | diffusers-txt2img-dpmpp_2m | "
            "diffusers vs original | dpmpp_2m / fp32 | 0.709 | 19.7 dB | ≤ 0.001, ≥ 40.0 dB "
            "| differs |") in lines
    assert "<script" not in md


def test_no_conformance_data_no_sections(tmp_path: Path) -> None:
    directory = write_sample(tmp_path / "plain", images=False)
    html = render(load(directory), "html")
    assert 'id="parity"' not in html and 'id="conformance"' not in html
    assert "Conformance" not in render(load(directory), "md")


def test_latest_record_and_unchecked_cells(frame: pd.DataFrame) -> None:
    # a re-run of the dpmpp_2m parity cell that now passes replaces the old record
    rerun = frame[frame["cell_id"] == "diffusers-txt2img-dpmpp_2m"].copy()
    rerun["timestamp"] = "2025-06-01T00:00:00+00:00"
    rerun["parity_status"] = "pass"
    rerun["parity_psnr_db"] = PSNR_IDENTICAL_DB
    rerun["check_results"] = [{"parity": {"status": "pass", "detail": "identical", "value": 0.0}}]
    conformance = build_conformance(pd.concat([frame, rerun]), lambda _relative: None)
    row = next(r for r in conformance.parity if r.cell_id == "diffusers-txt2img-dpmpp_2m")
    assert row.status == "pass" and psnr(row.psnr_db) == "identical"
    group = next(g for g in conformance.matrices[0].groups
                 if g.label == "txt2img · sampler dpmpp_2m")
    # the original cell's determinism check still shows; the re-run recorded none
    determinism = next(r for r in group.rows if r.check == "determinism")
    assert [o.status for o in determinism.outcomes] == ["pass", "none"]


# --- labels and formatting ----------------------------------------------------------------


def test_labels_and_formatting() -> None:
    assert lora_label("zoo:style@0.5+zoo:detail@1") == "style@0.5+detail@1"
    assert lora_label("/loras/My Style.safetensors@0.8") == "My Style@0.8"
    values = {name: None for name in ("model", "sampler", "lora", "embedding", "strength",
                                      "init_image", "mask", "outpaint_px", "hires_scale",
                                      "hires_upscaler")}
    values.update(workflow="outpaint", model="sd15-inpaint", outpaint_px=32, dtype="fp16",
                  lora="none", embedding="zoo:sbstyle")
    label = feature_label(values, {"outpaint_px", "dtype"}, {})
    assert label == "outpaint (9-channel) · outpaint 32 px · embedding sbstyle (fp16)"
    assert (psnr(19.6937), psnr(100.0), psnr(None)) == ("19.7 dB", "identical", "-")
    assert (rel_error(3.0979e-06), rel_error(0.0)) == ("3.1e-06", "0")
    assert set(CHECK_LABELS) >= {"determinism", "long_prompt", "parity", "lora_merged"}
    with pytest.raises(ValueError, match="status must be one of"):
        Outcome("maybe")


def test_psnr_identical_matches_the_harness() -> None:
    from harness.conformance import PSNR_IDENTICAL

    assert PSNR_IDENTICAL_DB == PSNR_IDENTICAL


def test_sample_covers_every_outcome() -> None:
    statuses = {check[0] for *_, checks, _ in CONFORMANCE_CELLS for check in checks.values()}
    assert statuses == {"pass", "fail", "error", "differs"}
    assert {status for _, _, status, *_ in CONFORMANCE_CELLS} == {"ok", "unsupported", "error"}


# --- the network-types table ----------------------------------------------------------------


def _networks_results(directory: Path) -> Path:
    """Two scenarios' LoRA cells as the harness records them (``lora_types`` whatever the
    status): a plain pair that both backends load, a LoHa diffusers refuses, and a cell
    without checks (no conformance data: left out)."""
    from harness.results import Result, ResultStore
    from reports.sample import _cell, metrics_for

    store = ResultStore(directory)
    base = {"model": "tiny", "device": "cpu", "dtype": "fp32", "width": 64, "height": 64,
            "steps": 4, "source": "safetensors", "repeats": 1, "warmup": 0,
            "checks": ("semantics", "parity")}
    passed = {name: {"status": "pass", "detail": f"{name} holds", "value": 0.0}
              for name in ("lora_strength0", "lora_monotonic", "lora_merged")}
    cells = [
        ("nets", "original-loha", {"backend": "original", "lora": "zoo:loha@1"}, "loha", None),
        ("nets", "diffusers-loha", {"lora": "zoo:loha@1"}, "loha",
         "diffusers 0.42.1 does not load a loha file (ValueError: <script>alert('x')</script>)"),
        ("nets", "original-lora", {"backend": "original", "lora": "zoo:style@1"}, "lora", None),
        ("more", "diffusers-lora", {"lora": "zoo:style@1"}, "lora", None),
    ]
    for scenario, cell_id, axes, types, refused in cells:
        cell = _cell(scenario, cell_id, **{**base, **axes})
        if refused:
            store.append(Result(run_id="r", cell=cell, status="unsupported", reason=refused,
                                metrics={"lora_types": types}))
            continue
        metrics = {**metrics_for(8.0, 1, 4, 0.5, None), "lora_types": types,
                   "check_results": passed, "checks_failed": 0}
        store.append(Result(run_id="r", cell=cell, status="ok", metrics=metrics))
    plain = _cell("plain", "diffusers-lora", **{**base, "checks": (), "lora": "zoo:style@1"})
    store.append(Result(run_id="r", cell=plain, status="ok",
                        metrics={**metrics_for(8.0, 1, 4, 0.5, None), "lora_types": "lora"}))
    return directory


def test_network_table_groups_lora_cells_by_type(tmp_path: Path) -> None:
    directory = _networks_results(tmp_path / "networks")
    frame = load(directory)
    conformance = build_conformance(frame, image_resolver(directory))
    table = conformance.networks
    assert table is not None and table.columns == ("original", "diffusers")
    # type order (lora before loha), then one group per lora value and scenario
    assert [g.label for g in table.groups] == [
        "lora · style@1 · nets", "lora · style@1 · more", "loha · loha@1 · nets"]
    assert [name for name, _ in conformance.network_types] == ["lora", "loha"]
    rows = {row.check: row for label, row in table.rows if label.startswith("loha")}
    assert list(rows) == ["run", "lora_strength0", "lora_monotonic", "lora_merged"]
    original, diffusers = rows["run"].outcomes
    assert original.status == "pass" and diffusers.status == "unsupported"
    assert "does not load a loha file" in (diffusers.reason or "")
    assert all(row.outcomes[1].status == "not run" for name, row in rows.items() if name != "run")
    html = render(frame, "html", image_root=directory)
    section = html.split('<section id="networks">', 1)[1].split("</section>", 1)[0]
    assert "<script" not in section and "&lt;script&gt;alert(" in section
    assert "LoHa: the Hadamard product" in section and '<a href="#networks">' in html
    md = render(frame, "md", image_root=directory)
    assert "### Network types" in md and "| loha · loha@1 · nets | runs | pass | unsupported (" in md
