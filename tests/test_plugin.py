"""``pytest --benchmark`` through pytester: collection, ids, skips, failures, JSON, regressions.

The scenario is smoke-like and as small as it gets: the tiny zoo model on the CPU at 64x64 px,
2 steps, 2-3 repeats, no warm-up; plus a CUDA cell (skipped here) and a cell whose model file
does not exist (a failure with the runner's one-line message).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# pytester's in-process runs drop the modules they imported when they end, and C extensions
# (numpy.fft via scipy, torch's operator libraries) cannot be imported twice: what an
# in-process run needs is imported here, and runs that load models go to a subprocess.
import harness.compare  # noqa: F401
from harness import baseline, environment
from harness.matrix import expand
from harness.results import Result, ResultStore, load
from harness.scenario import load_scenario

pytest_plugins = ["pytester"]

SCENARIO = """\
name: smoke
repeats: {repeats}
warmup: 0
matrix:
  backend: diffusers
  model: tiny
  device: [cpu, cuda]
  resolution: 64
  steps: 2
  batch: 1
  include:
    - {{model: missing.safetensors, source: safetensors, device: cpu}}
"""
CPU = "diffusers-tiny-hub-cpu"
CUDA = "diffusers-tiny-hub-cuda"
BROKEN = "diffusers-missing.safetensors-safetensors-cpu"


@pytest.fixture
def scenario(pytester: pytest.Pytester) -> Path:
    path = pytester.mkdir("scenarios") / "smoke.yaml"
    path.write_text(SCENARIO.format(repeats=2), encoding="utf-8")
    return path


REPO = Path(__file__).resolve().parent.parent


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """In-process: for runs that only collect."""
    return pytester.runpytest("-p", "harness.plugin", "-p", "no:cacheprovider", *args)


def run_cells(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str
) -> pytest.RunResult:
    """In a subprocess: for runs that load models and generate."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("CI", "1")  # pytest prints whole "FAILED id - message" lines on CI
    return pytester.runpytest_subprocess(
        "-p", "harness.plugin", "-p", "no:cacheprovider", *args, timeout=300
    )


def test_collects_one_item_per_cell_only_with_benchmark(
    pytester: pytest.Pytester, scenario: Path
) -> None:
    result = run(pytester, "--benchmark", "--collect-only", "-q")
    result.stdout.fnmatch_lines(
        [
            f"scenarios/smoke.yaml::{CPU}",
            f"scenarios/smoke.yaml::{CUDA}",
            f"scenarios/smoke.yaml::{BROKEN}",
            "3 tests collected*",
        ]
    )
    selected = run(pytester, "--benchmark", "--collect-only", "-q", "-k", "cuda")
    selected.stdout.fnmatch_lines([f"scenarios/smoke.yaml::{CUDA}", "1/3 tests collected*"])
    plain = run(pytester, "--collect-only", "-q", "scenarios")
    assert plain.ret == pytest.ExitCode.NO_TESTS_COLLECTED


def test_bad_scenario_is_one_line(pytester: pytest.Pytester, scenario: Path) -> None:
    scenario.write_text("matrix: {sampler: eulr}\n", encoding="utf-8")
    result = run(pytester, "--benchmark", "--collect-only")
    result.stdout.fnmatch_lines(["scenarios/smoke.yaml: matrix.sampler*: unknown sampler 'eulr'*"])
    result.stdout.no_fnmatch_line("*Traceback*")


def test_run_skips_fails_and_writes_benchmark_json(
    pytester: pytest.Pytester, scenario: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_cells(
        pytester,
        monkeypatch, "--benchmark", "-ra", "--benchmark-json=bench.json", "--bench-results=res"
    )
    result.assert_outcomes(passed=1, skipped=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            f"*_ {BROKEN} _*",
            "error: load failed: model 'missing.safetensors': no such file*",
            "*= sdbench =*",
            "3 cells: 1 error, 1 ok, 1 unsupported; results in *res*results.jsonl",
            "SKIPPED [[]1[]] scenarios/smoke.yaml:1: needs a CUDA device; none here",
            f"FAILED scenarios/smoke.yaml::{BROKEN} - error: load failed: *no such file*",
        ]
    )
    result.stdout.no_fnmatch_line("*Traceback*")
    result.stdout.no_fnmatch_line("*fixture was not used*")

    data = json.loads((pytester.path / "bench.json").read_text(encoding="utf-8"))
    (bench,) = data["benchmarks"]
    assert bench["name"] == CPU
    assert bench["fullname"] == f"scenarios/smoke.yaml::{CPU}"
    assert bench["group"] == "smoke"
    assert bench["stats"]["rounds"] == 2
    extra = bench["extra_info"]
    assert extra["status"] == "ok" and extra["its"] > 0 and len(extra["its_repeats"]) == 2
    assert extra["cpu_peak_gb"] > 0 and "gpu_allocated_peak_gb" in extra
    assert extra["cell"]["id"] == CPU and extra["cell"]["steps"] == 2
    assert extra["env"]["torch"] and extra["env_fingerprint"]

    frame = load(pytester.path / "res")
    assert sorted(frame["status"]) == ["error", "ok", "unsupported"]
    # pytest-benchmark holds the worker's own generation times, not the round trip to it
    walls = frame.loc[frame["status"] == "ok", "wall_s_repeats"].iloc[0]
    stats = bench["stats"]
    assert stats["min"] == min(walls) and stats["max"] == max(walls)
    assert stats["mean"] == pytest.approx(sum(walls) / len(walls), rel=1e-12)
    assert bench["options"]["timer"].endswith("ReplayClock")


@pytest.mark.slow
def test_xdist_keeps_load_groups_together_with_the_same_cells(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = pytester.mkdir("scenarios") / "smoke.yaml"
    path.write_text(
        "name: smoke\nrepeats: 2\nwarmup: 0\nmatrix:\n  backend: diffusers\n  model: tiny\n"
        "  device: cpu\n  resolution: 64\n  steps: 2\n  dtype: [fp32, bf16]\n  batch: [1, 2]\n",
        encoding="utf-8",
    )
    result = run_cells(
        pytester, monkeypatch, "--benchmark", "-n", "2", "--bench-results=res",
        "--bench-report=report.html",
    )
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*= sdbench =*", "4 cells: 4 ok; results in *res*results.jsonl"])
    frame = load(pytester.path / "res")
    cells = expand(load_scenario(path).model_copy(update={"path": "scenarios/smoke.yaml"}))
    assert sorted(frame["cell_id"]) == sorted(cell.id for cell in cells)
    assert frame["run_id"].nunique() == 1  # one run id across the xdist workers
    # the two cells of a load group ran on one xdist worker, from one load
    assert frame.groupby("dtype")["load_s"].nunique().eq(1).all()
    # (pytest-benchmark switches itself off under xdist: the results store has the figures)
    assert all(len(walls) == 2 for walls in frame["wall_s_repeats"])
    html = (pytester.path / "report.html").read_text(encoding="utf-8")
    assert all(cell.id in html for cell in cells)


@pytest.mark.slow
def test_regression_against_a_doctored_baseline_fails_the_item(
    pytester: pytest.Pytester, scenario: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario.write_text(SCENARIO.format(repeats=3), encoding="utf-8")
    # A baseline 100x faster than this machine, 20 repeats: a certain regression.
    env = environment.collect()
    cells = expand(load_scenario(scenario).model_copy(update={"path": "scenarios/smoke.yaml"}))
    store = ResultStore(pytester.path / "doctored")
    for cell in cells:
        repeats = [1000.0 + i for i in range(20)]
        metrics = {"its": 1010.0, "its_repeats": repeats, "cpu_peak_gb": 0.01, "load_s": 0.01}
        store.append(Result("old", cell, "ok", metrics=metrics, env=env,
                            env_fingerprint=environment.fingerprint(env)))
    baseline.save(store.path, pytester.path / "baselines")

    result = run_cells(
        pytester,
        monkeypatch,
        "--benchmark",
        "-k",
        "tiny and cpu",
        "--bench-baseline=baselines",
        "--bench-report=report.html",
        "--bench-results=res",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            f"*_ {CPU} _*",
            "regression: its: 1.01e+03 it/s → * it/s (-*%, p=*, threshold 5%);"
            " cpu_peak_gb: 0.01 GB → * GB (+*%, threshold 10%)*",
            "*= sdbench =*",
            "against *baselines*results.jsonl: 3 regression, 1 new",
            "report: *report.html",
            f"FAILED scenarios/smoke.yaml::{CPU} - regression: its: *",
        ]
    )
    html = (pytester.path / "report.html").read_text(encoding="utf-8")
    assert CPU in html


def test_extra_metrics_are_fields_the_measurement_produces() -> None:
    """Every name copied into ``benchmark.extra_info`` is a key of ``Measurement.summary``
    (a renamed or misspelt metric would silently never reach the JSON)."""
    from dataclasses import fields

    from harness.measure import Baseline, Measurement, MemoryPeaks, Timing
    from harness.plugin import EXTRA_METRICS

    measurement = Measurement.from_timings(
        batch=1,
        steps=2,
        timings=[Timing(wall=1.0, encode=0.1, denoise=0.8, decode=0.1, steps=(0.4, 0.4))],
        first_call_s=1.0,
        load_s=1.0,
        memory=MemoryPeaks(cpu_rss_sampled_gb=1.0, cpu_rss_os_peak_gb=None),
        baseline=Baseline(cpu_rss_gb=0.5),  # the executor always measures from one
    )
    produced = set(measurement.summary())
    assert {f.name for f in fields(MemoryPeaks)} <= produced
    assert [name for name in EXTRA_METRICS if name not in produced] == []
