"""Regression verdicts on synthetic results with known changes (asv test_step_detect style)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from harness import baseline, cli, compare
from harness.matrix import Cell, expand
from harness.results import Result, ResultStore, load, to_row
from harness.scenario import Thresholds, parse_scenario

ENV: dict[str, Any] = {
    "gpu_name": "NVIDIA GeForce RTX 3060",
    "gpu_count": 1,
    "cuda": "12.4",
    "torch": "2.5.1",
    "diffusers": "0.31.0",
    "transformers": "4.46.0",
    "accelerate": "1.1.0",
    "cpu": "AMD Ryzen 7 5800X",
    "os": "Linux 6.8",
    "harness_commit": "abc123",
}


def cells(batches: tuple[int, ...] = (1, 2)) -> list[Cell]:
    scenario = parse_scenario(
        {"name": "synthetic", "matrix": {"backend": "diffusers", "batch": list(batches)}},
        "scenarios/synthetic.yaml",
    )
    return expand(scenario)


def result(
    cell: Cell,
    rng: np.random.Generator,
    *,
    its: float = 8.0,
    noise: float = 0.02,
    repeats: int = 5,
    cpu_gb: float = 4.0,
    gpu_gb: float = 6.0,
    env: dict[str, Any] | None = None,
    status: str = "ok",
) -> Result:
    environment = dict(ENV if env is None else env)
    fingerprint = compare.environment.fingerprint(environment)
    if status != "ok":
        return Result("run", cell, status, reason="RuntimeError: boom", env=environment,
                      env_fingerprint=fingerprint)
    samples = its * (1 + noise * rng.standard_normal(repeats))
    denoise = samples * 1.25
    metrics = {
        "its": float(np.median(samples)),
        "its_repeats": samples.tolist(),
        "denoise_its": float(np.median(denoise)),
        "denoise_its_repeats": denoise.tolist(),
        "cpu_peak_gb": cpu_gb,
        "gpu_allocated_peak_gb": gpu_gb,
        "gpu_reserved_peak_gb": gpu_gb * 1.1,
        "load_s": 3.0,
    }
    return Result("run", cell, "ok", metrics=metrics, env=environment,
                  env_fingerprint=fingerprint)


def frame(results: list[Result]) -> pd.DataFrame:
    return pd.DataFrame([to_row(r) for r in results])


def verdicts(comparison: compare.Comparison, metric: str = "its") -> list[str]:
    table = comparison.table
    return list(table[table["metric"] == metric]["verdict"])


def test_ten_percent_slowdown_with_five_repeats_at_two_percent_noise_is_flagged() -> None:
    flagged = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        (cell,) = cells((1,))
        before = frame([result(cell, rng, its=8.0, noise=0.02)])
        after = frame([result(cell, rng, its=8.0 * 0.9, noise=0.02)])
        comparison = compare.compare(before, after)
        flagged += verdicts(comparison) == ["regression"]
        if seed == 0:
            row = comparison.regressions.iloc[0]
            assert row["change"] == pytest.approx(-0.1, abs=0.03)
            assert row["p_value"] < compare.DEFAULT_ALPHA
            assert row["note"] == "Mann-Whitney U"
            assert comparison.exit_status == 1
    assert flagged >= 99


def test_unchanged_runs_at_three_percent_noise_are_not_flagged() -> None:
    flagged = 0
    for seed in range(100):
        rng = np.random.default_rng(1000 + seed)
        (cell,) = cells((1,))
        before = frame([result(cell, rng, noise=0.03)])
        after = frame([result(cell, rng, noise=0.03)])
        comparison = compare.compare(before, after)
        flagged += comparison.exit_status or set(comparison.table["verdict"]) != {"unchanged"}
    assert flagged <= 1


def test_memory_growth_is_flagged_on_the_threshold_alone() -> None:
    rng = np.random.default_rng(0)
    (cell,) = cells((1,))
    before = frame([result(cell, rng, cpu_gb=4.0, gpu_gb=6.0)])
    after = frame([result(cell, rng, cpu_gb=4.2, gpu_gb=7.2)])  # +5% cpu, +20% gpu
    table = compare.compare(before, after).table.set_index("metric")
    assert table.loc["cpu_peak_gb", "verdict"] == "unchanged"
    assert table.loc["gpu_allocated_peak_gb", "verdict"] == "regression"
    assert table.loc["gpu_allocated_peak_gb", "change"] == pytest.approx(0.2)
    assert table.loc["gpu_allocated_peak_gb", "threshold"] == 0.10
    assert math.isnan(table.loc["gpu_allocated_peak_gb", "p_value"])
    assert table.loc["gpu_allocated_peak_gb", "note"] == "single value: threshold only"
    smaller = compare.compare(after, before).table.set_index("metric")
    assert smaller.loc["gpu_allocated_peak_gb", "verdict"] == "improvement"


def test_scenario_thresholds_apply_per_scenario() -> None:
    rng = np.random.default_rng(0)
    (cell,) = cells((1,))
    before = frame([result(cell, rng, gpu_gb=6.0)])
    after = frame([result(cell, rng, gpu_gb=7.2)])
    loose = {"synthetic": Thresholds(memory=0.5)}
    table = compare.compare(before, after, loose).table.set_index("metric")
    assert table.loc["gpu_allocated_peak_gb", "verdict"] == "unchanged"
    assert table.loc["gpu_allocated_peak_gb", "threshold"] == 0.5


def test_speedup_is_an_improvement_and_columns_are_as_documented() -> None:
    rng = np.random.default_rng(3)
    (cell,) = cells((1,))
    comparison = compare.compare(
        frame([result(cell, rng, its=8.0)]), frame([result(cell, rng, its=10.0)])
    )
    assert tuple(comparison.table.columns) == compare.COLUMNS
    assert verdicts(comparison) == ["improvement"]
    assert verdicts(comparison, "denoise_its") == ["improvement"]
    assert comparison.exit_status == 0


def test_environment_mismatch_is_not_comparable_and_says_what_differs() -> None:
    rng = np.random.default_rng(0)
    (cell,) = cells((1,))
    other = {**ENV, "gpu_name": "NVIDIA H100 80GB HBM3", "torch": "2.6.0"}
    comparison = compare.compare(
        frame([result(cell, rng)]), frame([result(cell, rng, its=4.0, env=other)])
    )
    assert set(comparison.table["verdict"]) == {"not comparable"}
    note = comparison.table["note"].iloc[0]
    assert "gpu_name: 'NVIDIA GeForce RTX 3060' → 'NVIDIA H100 80GB HBM3'" in note
    assert "torch: '2.5.1' → '2.6.0'" in note
    assert comparison.exit_status == 0


def test_dtype_mismatch_is_not_comparable() -> None:
    rng = np.random.default_rng(0)
    (cell,) = cells((1,))
    fp16 = Cell.from_dict({**cell.to_dict(), "dtype": "fp16"})
    comparison = compare.compare(frame([result(cell, rng)]), frame([result(fp16, rng)]))
    assert set(comparison.table["verdict"]) == {"not comparable"}
    assert "dtype: 'fp32' → 'fp16'" in comparison.table["note"].iloc[0]


def test_new_and_missing_cells() -> None:
    rng = np.random.default_rng(0)
    one, two = cells((1, 2))
    (three,) = [c for c in cells((1, 2, 4)) if c.batch == 4]
    comparison = compare.compare(
        frame([result(one, rng), result(two, rng)]),
        frame([result(one, rng), result(three, rng)]),
    )
    by_cell = comparison.table.groupby("cell_id")["verdict"].agg(set).to_dict()
    assert by_cell[three.id] == {"new"}
    assert by_cell[two.id] == {"missing"}
    assert by_cell[one.id] == {"unchanged"}
    assert comparison.exit_status == 0


def test_a_cell_failing_now_is_missing_with_its_error() -> None:
    rng = np.random.default_rng(0)
    (cell,) = cells((1,))
    comparison = compare.compare(
        frame([result(cell, rng)]), frame([result(cell, rng, status="error")])
    )
    assert set(comparison.table["verdict"]) == {"missing"}
    assert comparison.table["note"].iloc[0] == "current: error: RuntimeError: boom"


def test_small_samples_fall_back_to_welch_on_logs() -> None:
    p, test = compare.one_sided_p([10.0, 10.1], [5.0, 5.1], "less")
    assert test == "Welch t on logs" and p < 0.01
    before, after = [10.0, 10.2, 9.9, 10.1, 10.05], [9.0, 9.1, 8.9, 9.2, 9.05]
    p, test = compare.one_sided_p(before, after, "less")
    assert test == "Mann-Whitney U" and p == pytest.approx(1 / 252)
    p, test = compare.one_sided_p([10.0], [5.0], "less")
    assert math.isnan(p)
    p, _ = compare.one_sided_p([10.0, 10.0], [5.0, 5.0], "less")
    assert p == 0.0


def test_text_and_markdown_rendering() -> None:
    rng = np.random.default_rng(0)
    (cell,) = cells((1,))
    comparison = compare.compare(
        frame([result(cell, rng, its=8.0)]), frame([result(cell, rng, its=6.0)])
    )
    text = compare.to_text(comparison)
    row = comparison.table[comparison.table["metric"] == "its"].iloc[0]
    spread = f"±{row['baseline_cv']:.1%}", f"±{row['current_cv']:.1%}"
    assert 0 < row["baseline_cv"] < 0.05 and row["noise_limit"] == 0.05
    assert (f"regression  synthetic::diffusers  its: 8.02 it/s {spread[0]} → 6.04 it/s "
            f"{spread[1]} (-24.6%, p=0.004") in text
    assert text.splitlines()[-1].startswith("verdict: ")
    markdown = compare.to_markdown(comparison)
    assert markdown.startswith("**sdbench: ❌ regressions found**")
    assert "| regression | `synthetic::diffusers` | its |" in markdown
    # a figure whose repeats spread past the scenario's noise limit reads as noisy
    noisy = compare.compare(frame([result(cell, rng, its=8.0, noise=0.2)]),
                            frame([result(cell, rng, its=8.0)]))
    assert " noisy → " in compare.to_text(noisy, show_all=True)


# -- baselines and the command line ----------------------------------------------------------


def write(directory: Path, results: list[Result]) -> Path:
    store = ResultStore(directory)
    for item in results:
        store.append(item)
    return store.path


def run_cli(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> int:
    def extra() -> list[Any]:
        return [compare.register, baseline.register]

    monkeypatch.setattr(cli, "_extra_commands", extra)
    return cli.main(argv)


def test_cli_compare_exits_1_on_regression(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    (cell,) = cells((1,))
    write(tmp_path / "base", [result(cell, rng, its=8.0)])
    write(tmp_path / "same", [result(cell, rng, its=8.0)])
    write(tmp_path / "slow", [result(cell, rng, its=6.0)])
    assert run_cli(monkeypatch, ["compare", str(tmp_path / "base"), str(tmp_path / "same")]) == 0
    assert "verdict: " in capsys.readouterr().out
    code = run_cli(
        monkeypatch,
        ["compare", str(tmp_path / "base"), str(tmp_path / "slow"), "--format", "md"],
    )
    assert code == 1
    assert "| regression |" in capsys.readouterr().out
    # A looser threshold on the command line wins over the scenario's.
    code = run_cli(
        monkeypatch,
        ["compare", str(tmp_path / "base"), str(tmp_path / "slow"), "--speed-threshold", "30%"],
    )
    assert code == 0
    assert run_cli(monkeypatch, ["compare", str(tmp_path / "nope"), str(tmp_path / "slow")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_baseline_save_keeps_one_store_per_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    one, two = cells((1, 2))
    h100 = {**ENV, "gpu_name": "NVIDIA H100 80GB HBM3"}
    run = write(
        tmp_path / "run",
        [result(one, rng), result(two, rng), result(one, rng, env=h100)],
    )
    root = tmp_path / "baselines"
    assert run_cli(monkeypatch, ["baseline", "save", str(run), "--dir", str(root)]) == 0
    saved = baseline.stores(root)
    assert len(saved) == 2
    assert len(load(saved[compare.environment.fingerprint(ENV)])) == 2
    assert run_cli(monkeypatch, ["baseline", "show", "--dir", str(root)]) == 0
    shown = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3" in shown and "2 cells (2 ok)" in shown

    # Saving again replaces a cell's record and keeps the others.
    write(tmp_path / "again", [result(two, rng, its=9.5)])
    baseline.save(tmp_path / "again", root)
    records = load(saved[compare.environment.fingerprint(ENV)])
    assert sorted(records["cell_id"]) == sorted([one.id, two.id])

    # From a root, the current environment's baseline is chosen.
    fingerprint = compare.environment.fingerprint(h100)
    assert baseline.resolve(root, fingerprint) == saved[fingerprint]
    assert baseline.resolve(run, fingerprint) == run
    assert baseline.resolve(root, "unknown") in saved.values()


def test_threshold_option_parsing() -> None:
    from harness.options import add_threshold_options, threshold_overrides

    parser = argparse.ArgumentParser()
    add_threshold_options(parser.add_argument, prefix="")
    args = parser.parse_args(["--speed-threshold", "7%", "--memory-threshold", "0.2"])
    assert threshold_overrides(args) == {"speed": pytest.approx(0.07), "memory": 0.2}
    with pytest.raises(SystemExit):
        parser.parse_args(["--speed-threshold", "fast"])
