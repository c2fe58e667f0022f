"""scripts/gpu-check.sh: its dry run (slow: about two minutes on two cores) and its scenarios."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from harness import expand, load, load_scenario

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
STAGES = ["install", "doctor", "synth", "pytest", "table-none", "table-medvram",
          "table-lowvram", "compile", "report"]
OUTPUTS = {"table.md", "report.html", "results.jsonl", "environment.json", "doctor.json",
           "stages.tsv", "gpu-check.log"}


def test_the_dry_run_has_the_cells_of_the_gpu_run() -> None:
    gpu = expand(load_scenario(ROOT / "scenarios/gpu-check.yaml"))
    dry = expand(load_scenario(ROOT / "scenarios/gpu-check-dry.yaml"))
    assert [c.id for c in dry] == [c.id for c in gpu]
    assert len(gpu) == 20 and {c.model for c in gpu} == {"sd15-fp16"}
    assert {(c.offload, c.batch) for c in gpu if c.compile == "none"} == {
        (offload, batch) for offload in ("none", "medvram", "lowvram") for batch in (1, 4, 16)}
    assert sorted(c.backend for c in gpu if c.compile == "default") == ["diffusers", "original"]
    assert {(c.repeats, c.warmup) for c in gpu} == {(3, 1)}


def test_usage() -> None:
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "usage: scripts/gpu-check.sh" in run.stderr
    help_text = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True,
                               timeout=30).stdout
    assert "pip download" in help_text and "diffusers==" in help_text


@pytest.mark.slow
def test_dry_run_passes_in_three_minutes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    start = time.monotonic()
    run = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "WORK": str(tmp_path / "work")},
    )
    elapsed = time.monotonic() - start
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert elapsed < 180, f"the dry run took {elapsed:.0f} s"
    assert {p.name for p in out.iterdir()} == OUTPUTS  # at most 8 files come back from a device

    stages = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()]
    assert [s[0] for s in stages] == [*STAGES, "total"]
    assert all(s[1] == "ok" for s in stages), stages

    frame = load(out / "results.jsonl")
    assert len(frame) == 20
    ran = frame[frame["offload"] == "none"]
    assert set(ran["status"]) == {"ok"} and set(ran["compile"]) == {"none", "default"}
    offloaded = frame[frame["offload"] != "none"]
    assert set(offloaded["status"]) == {"unsupported"}
    assert offloaded["reason"].str.contains("CUDA").all()

    table = (out / "table.md").read_text()
    assert "| pipeline | performance it/s (batch 1 / 4 / 16) |" in table
    assert "| diffusers (compile default) |" in table
    env = json.loads((out / "environment.json").read_text())["env"]
    assert env["torch"] and isinstance(env["doctor"], list)
    doctor = json.loads((out / "doctor.json").read_text())
    assert doctor["fit"] is True
    assert "gpu-check: done in" in (out / "gpu-check.log").read_text()
