"""benchmarks/*.py --quick: the scripts run end to end and print their ratios (slow-marked;
the figures themselves are for people, never asserted as timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run(script: str, tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / f"{script}.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--json", str(out),
         *args],
        capture_output=True, text=True, cwd=ROOT, check=False,
        env=os.environ | {"TQDM_DISABLE": "1"}, timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text())


def test_overhead_quick(tmp_path: Path) -> None:
    ratios = _run("overhead", tmp_path, "--parts")
    assert {r["name"].split()[0] for r in ratios} == {"diffusers", "original"}
    assert all(r["rounds"] == 2 and r["median"] > 0 for r in ratios)
    # per backend: the cell, then the timed region's pieces, each against the bare call
    assert [r["a"] for r in ratios] == ["harness", "timer", "monitored"] * 2
    assert {r["b"] for r in ratios} == {"bare"}


def test_unet_quick(tmp_path: Path) -> None:
    ratios = _run("unet", tmp_path, "--profile")
    assert {r["name"].split()[0] for r in ratios} == {"unet", "vae"}
    assert all(r["a"] == "original" and r["b"] == "diffusers" for r in ratios)


def test_memory_quick(tmp_path: Path) -> None:
    rows = _run("memory", tmp_path)
    assert {row["file"] for row in rows} == {"zoo"}
    assert all(row["original"] > 0 and row["diffusers"] > 0 for row in rows)


def test_generate_quick(tmp_path: Path) -> None:
    ratios = _run("generate", tmp_path)
    assert [r["name"].split()[0] for r in ratios] == ["denoise", "it/s"]
    assert all(r["a"] == "original" and r["median"] > 0 for r in ratios)
