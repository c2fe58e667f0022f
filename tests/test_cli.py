"""End to end through the public entry points: ``python -m harness run`` / ``report``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from html import unescape
from pathlib import Path

import pytest

from harness import load
from tests.conftest import write_scenario

ROOT = Path(__file__).resolve().parent.parent


def harness(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
        env=os.environ | {"TQDM_DISABLE": "1"},
    )


def test_smoke_scenario_then_html_report(tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    done = harness("run", "scenarios/smoke.yaml", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    frame = load(out)
    assert len(frame) == 14 and set(frame["status"]) == {"ok"}
    assert len(re.findall(r"^\[\d+/14\] smoke::", done.stdout, flags=re.M)) == 14
    assert "14 cells: 14 ok" in done.stdout
    assert set(frame["backend"]) == {"diffusers", "original"}
    assert frame["parity_ref_backend"].dropna().eq("diffusers").sum() == 6  # every original cell

    report = tmp_path / "report.html"
    done = harness("report", str(out), "-o", str(report))
    assert done.returncode == 0, done.stderr
    html = unescape(report.read_text())
    # every it/s of the results file appears in the table at two decimals
    for its in frame["its"]:
        assert f"{its:.2f}" in html
    assert "http://" not in html and "https://" not in html

    done = harness("report", str(out), "--format", "md")
    assert done.returncode == 0
    assert "| pipeline |" in done.stdout


def test_exit_status_1_when_a_cell_fails(tmp_path: Path) -> None:
    scenario = write_scenario(
        tmp_path,
        "name: failing\nrepeats: 1\nwarmup: 0\n"
        "matrix:\n  model: [tiny, nowhere.safetensors]\n  source: safetensors\n"
        "  device: cpu\n  resolution: 64\n  steps: 2\n",
    )
    # in-process: the exit status is the command's, whatever runs the cells
    done = harness("run", str(scenario), "--out", str(tmp_path / "out"), "--isolate", "none")
    assert done.returncode == 1, done.stdout + done.stderr
    statuses = [json.loads(line)["status"] for line in (tmp_path / "out/results.jsonl").open()]
    assert statuses == ["ok", "error"]
    assert "Traceback" not in done.stdout


@pytest.mark.slow
def test_models_list_and_write(tmp_path: Path) -> None:
    done = harness("models", "list")
    assert done.returncode == 0
    assert "tiny" in done.stdout and "sd15" in done.stdout
    target = tmp_path / "tiny.safetensors"
    done = harness("models", "write", "tiny", "--format", "safetensors", "--out", str(target))
    assert done.returncode == 0, done.stderr
    assert target.stat().st_size > 100_000
    done = harness("models", "write", "nosuch", "--format", "hub", "--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert "nosuch" in done.stderr and "Traceback" not in done.stderr


LONG = (
    "name: long\nrepeats: 1\nwarmup: 0\n"
    "matrix:\n  model: tiny\n  device: cpu\n  resolution: 64\n  steps: 4\n"
    "  seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]\n"
    "  batch: 4\n"
)


def _start_run(scenario: Path, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "harness", "run", str(scenario), "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for_records(results: Path, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if results.exists() and len(results.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)


def _workers_of(out: Path) -> list[int]:
    """Worker processes writing into ``out``: a fresh interpreter's command line names it; a
    worker forked from the template has its stderr in ``out/workers/logs``."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = process.info["cmdline"] or []
        try:
            stderr = os.readlink(f"/proc/{process.pid}/fd/2")
        except OSError:
            stderr = ""
        if ("harness.worker" in cmdline and str(out) in cmdline) or stderr.startswith(str(out)):
            found.append(process.pid)
    return found


def _no_workers_left(out: Path, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while _workers_of(out):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.slow
def test_killed_run_keeps_finished_cells_and_resumes(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, LONG)
    out = tmp_path / "out"
    results = out / "results.jsonl"
    process = _start_run(scenario, out)
    _wait_for_records(results, 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if process.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    frame = load(results)
    lines = [line for line in results.read_text().splitlines() if line.strip()]
    assert 2 <= len(frame) < 20
    assert len(frame) in (len(lines), len(lines) - 1)  # a line cut mid-write is skipped
    assert set(frame["status"]) == {"ok"}
    assert _no_workers_left(out)  # the orphaned worker noticed and left

    done = harness("run", str(scenario), "--out", str(out), "--resume", "--no-images")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming: {len(frame)} of 20 cells already have a record" in done.stdout
    resumed = load(results)
    assert len(resumed) == 20 and resumed["cell_id"].is_unique  # one record per cell
    assert set(resumed["status"]) == {"ok"}

    again = harness("run", str(scenario), "--out", str(out), "--resume")
    assert again.returncode == 0 and "0 cells: none to run" in again.stdout
    assert len(load(results)) == 20


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_and_keeps_finished_cells(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, LONG)
    out = tmp_path / "out"
    process = _start_run(scenario, out)
    _wait_for_records(out / "results.jsonl", 2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("the run finished before it could be interrupted")
    assert process.returncode == 1
    assert b"interrupted; finished cells are in the results file" in stderr
    assert b"Traceback" not in stderr
    frame = load(out)
    assert 2 <= len(frame) < 20 and set(frame["status"]) == {"ok"}
    assert _no_workers_left(out, within=2.0)


@pytest.mark.slow
def test_shards_cover_the_scenario_and_report_merges_them(tmp_path: Path) -> None:
    scenario = write_scenario(
        tmp_path,
        "name: sharded\nrepeats: 1\nwarmup: 0\n"
        "matrix:\n  model: tiny\n  device: cpu\n  resolution: 64\n  steps: 2\n"
        "  dtype: [fp32, bf16]\n  batch: [1, 2]\n",
    )
    for index in (1, 2):
        done = harness("run", str(scenario), "--out", str(tmp_path / f"shard{index}"),
                       "--shard", f"{index}/2", "--no-images")
        assert done.returncode == 0, done.stdout + done.stderr
    parts = [load(tmp_path / f"shard{index}") for index in (1, 2)]
    assert [len(part) for part in parts] == [2, 2]
    assert [set(part["dtype"]) for part in parts] in ([{"fp32"}, {"bf16"}], [{"bf16"}, {"fp32"}])
    done = harness("report", str(tmp_path / "shard1"), str(tmp_path / "shard2"), "--format", "md")
    assert done.returncode == 0, done.stderr
    assert "4 cells" in done.stdout or done.stdout.count("|") > 10
    bad = harness("run", str(scenario), "--shard", "3/2")
    assert bad.returncode == 2 and "--shard: expected K/N" in bad.stderr
