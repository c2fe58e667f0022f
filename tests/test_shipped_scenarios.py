"""The shipped scenarios: the sd15 table runs (or is unsupported with a reason) everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from harness import expand, load_scenario, parse_scenario
from harness.runner import Runner, any_failed

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the sd15 table really runs")
def test_sd15_table_without_cuda_is_unsupported_with_a_reason(tmp_path: Path) -> None:
    cells = expand(load_scenario(ROOT / "scenarios/sd15-table.yaml"))
    assert len(cells) == 35
    results = Runner(tmp_path, progress=False, isolate="none").run(cells)
    assert {r.status for r in results} == {"unsupported"}
    assert all("CUDA" in (r.reason or "") for r in results)


def test_a_tiny_copy_of_the_sd15_table_runs_on_both_backends(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "scenarios/sd15-table.yaml").read_text())
    data["name"] = "table-copy"
    data.update(repeats=1, warmup=0, timeout_s=120)
    data["matrix"].update(
        model="tiny", device="auto", dtype="fp32", resolution=64, steps=4, batch=[1, 2]
    )
    cells = expand(parse_scenario(data, "table-copy.yaml"))
    results = Runner(tmp_path, progress=False, isolate="none").run(cells)
    assert not any_failed(results), [(r.cell.id, r.reason) for r in results if r.status != "ok"]
    by_id = {r.cell.id: r for r in results}
    for backend, source in (("original", "safetensors"), ("diffusers", "hub"),
                            ("diffusers", "safetensors")):
        for batch in (1, 2):
            result = by_id[f"{backend}-nooffload-{source}-b{batch}"]
            assert result.status == "ok", result.reason
    offloaded = [r for r in results if r.cell.offload != "none"]
    if not torch.cuda.is_available():
        assert offloaded and all(r.status == "unsupported" for r in offloaded)
        assert all("CUDA" in (r.reason or "") for r in offloaded)
    # the diffusers rows are compared with the original rows of the same batch size
    parity = by_id["diffusers-nooffload-hub-b2"].metrics
    assert parity["parity_ref"] == "original-nooffload-safetensors-b2"
    assert parity["parity_psnr_db"] > 0
