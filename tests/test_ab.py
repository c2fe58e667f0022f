"""``python -m harness ab`` and ``pytest --bench-ab-base`` end to end on the tiny model.

The head side of an A/B is a real code difference: a directory whose ``sitecustomize.py``
makes the UNet forward 15% slower (tests/data/slow_unet), first on the workers' path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.ab import MAX_REPEATS_PER_ROUND, ROUND_MIN_S, load_ab, repeats_per_round, resolve_side
from harness.errors import UserError
from tests.conftest import write_scenario

ROOT = Path(__file__).resolve().parent.parent
SLOW = ROOT / "tests" / "data" / "slow_unet"
SCENARIO = (
    "name: ab\nrepeats: 1\nwarmup: 1\n"
    "matrix:\n  backend: diffusers\n  model: tiny\n  device: cpu\n  resolution: 64\n"
    "  steps: 8\n  batch: 1\n"
)


def harness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=ROOT,
        check=False, env=os.environ | {"TQDM_DISABLE": "1"},
    )


def test_a_against_a_is_not_flagged_and_the_report_shows_it(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, SCENARIO)
    same = tmp_path / "same"
    same.mkdir()
    out = tmp_path / "out"
    done = harness("ab", str(scenario), "--base", str(same), "--head", str(same), "--out",
                   str(out), "--max-rounds", "6", "--seed", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = load_ab(out)
    assert record["verdict"] in ("unchanged", "inconclusive")
    assert record["seed"] and len(record["order"]) == record["verdicts"][0]["rounds"]
    assert 1 <= record["repeats_per_round"] <= MAX_REPEATS_PER_ROUND
    assert {tuple(pair) for pair in record["order"]} <= {("base", "head"), ("head", "base")}
    assert record["base"]["kind"] == record["head"]["kind"] == "dir"
    rounds = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["metrics"]["ab_side"] for r in rounds} == {"base", "head"}
    # every round ran the recorded count of generations per side, one record each, the sides
    # taking turns (tiny: several a round, unless the machine is so loaded that one lasts it)
    per_round: dict[tuple[int, str], list[int]] = {}
    for r in rounds:
        key = (r["metrics"]["ab_round"], r["metrics"]["ab_side"])
        per_round.setdefault(key, []).append(r["metrics"]["ab_turn"])
    turns = list(range(1, record["repeats_per_round"] + 1))
    assert all(found == turns for found in per_round.values())
    assert len(per_round) == 2 * len(record["order"])
    md = harness("report", str(out), "--format", "md")
    assert "### A/B: head against base" in md.stdout and "| ab::diffusers |" in md.stdout
    html = harness("report", str(out), "-o", str(tmp_path / "ab.html"))
    assert html.returncode == 0
    assert "A/B: head against base" in (tmp_path / "ab.html").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("base, head, expected", [
    ("same", "slow", "regression"), ("slow", "same", "improvement"),
])
def test_a_fifteen_percent_slower_unet_is_found(tmp_path: Path, base, head, expected) -> None:
    scenario = write_scenario(tmp_path, SCENARIO)
    sides = {"same": tmp_path / "same", "slow": SLOW}
    sides["same"].mkdir()
    done = harness("ab", str(scenario), "--base", str(sides[base]), "--head", str(sides[head]),
                   "--out", str(tmp_path / "out"))
    (record,) = load_ab(tmp_path / "out")
    assert record["verdict"] == expected, done.stdout
    assert done.returncode == (1 if expected == "regression" else 0)


def test_a_round_lasts_at_least_its_minimum_on_the_faster_side() -> None:
    assert repeats_per_round([ROUND_MIN_S * 2, ROUND_MIN_S * 3]) == 1
    assert repeats_per_round([ROUND_MIN_S / 4, ROUND_MIN_S / 2]) == 4  # the faster side's count
    assert repeats_per_round([ROUND_MIN_S / 1000, None]) == MAX_REPEATS_PER_ROUND
    assert repeats_per_round([None, None]) == 1


def test_sides_from_a_git_ref_a_directory_and_a_python(tmp_path: Path) -> None:
    repo = tmp_path / "app"
    repo.mkdir()
    (repo / "myapp.py").write_text("VERSION = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    side = resolve_side("base", "HEAD", repo, tmp_path / "work")
    assert side.kind == "ref" and len(side.commit) == 40
    tree = Path(side.spec.pythonpath[0])
    assert (tree / "myapp.py").read_text() == "VERSION = 1\n"
    side.close()
    assert not tree.exists()
    assert resolve_side("head", str(repo), repo, tmp_path).kind == "dir"
    assert resolve_side("head", sys.executable, repo, tmp_path).spec.python
    with pytest.raises(UserError, match="--base: 'nope' is not a Python executable"):
        resolve_side("base", "nope", repo, tmp_path / "work")


pytest_plugins = ["pytester"]


@pytest.mark.slow
def test_pytest_bench_ab_base(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    path = pytester.mkdir("scenarios") / "ab.yaml"
    path.write_text(SCENARIO, encoding="utf-8")
    same = pytester.mkdir("same")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = pytester.runpytest_subprocess(
        "-p", "harness.plugin", "-p", "no:cacheprovider", "--benchmark",
        f"--bench-ab-base={same}", "--bench-ab-max-rounds=8", "--bench-results=res",
        "--benchmark-json=bench.json", timeout=300,
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*= sdbench A/B =*", f"1 cells against {same}: 1 *"])
    (record,) = load_ab(pytester.path / "res")
    data = json.loads((pytester.path / "bench.json").read_text(encoding="utf-8"))
    (bench,) = data["benchmarks"]
    walls = [entry["wall_s"] for entry in record["series"]["head"]]
    assert bench["stats"]["rounds"] == len(walls) and bench["stats"]["min"] == min(walls)
