"""Scenario validation: good files load, bad ones give one line naming file, field, expectation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness import UserError, expand, load_scenario, parse_scenario
from tests.conftest import write_scenario

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_scenarios_validate() -> None:
    for path in sorted((ROOT / "scenarios").glob("*.yaml")):
        scenario = load_scenario(path)
        assert scenario.name == path.stem


def test_scalars_become_lists_and_defaults_apply() -> None:
    scenario = parse_scenario({"matrix": {"batch": 2, "resolution": "768x512"}}, "x.yaml")
    assert scenario.matrix.batch == [2]
    assert scenario.matrix.resolution == [(768, 512)]
    assert scenario.matrix.sampler == ["euler"]
    assert scenario.repeats == 3 and scenario.thresholds.speed == 0.05
    assert scenario.name == "x"


def test_fingerprint_tracks_content_not_path() -> None:
    a = parse_scenario({"matrix": {"batch": [1, 2]}}, "a.yaml")
    b = parse_scenario({"name": "a", "matrix": {"batch": [1, 2]}}, "elsewhere/a.yaml")
    c = parse_scenario({"name": "a", "matrix": {"batch": [1, 4]}}, "a.yaml")
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("matrix:\n  batchsize: 2\n", "bad.yaml: matrix.batchsize: unknown key; expected one of"),
        ("repeatz: 2\n", "bad.yaml: repeatz: unknown key; expected one of name,"),
        ("matrix:\n  batch: two\n", "bad.yaml: matrix.batch[0]: Input should be a valid integer"),
        ("matrix:\n  sampler: [euler, eulr]\n", "bad.yaml: matrix.sampler[1]: unknown sampler 'eulr'"),
        ("matrix:\n  resolution: 500\n", "bad.yaml: matrix.resolution[0]: width and height must be positive multiples of 8"),
        ("matrix:\n  resolution: big\n", "bad.yaml: matrix.resolution[0]: expected an int or 'WIDTHxHEIGHT'"),
        ("matrix:\n  offload: cpu\n", "bad.yaml: matrix.offload[0]: Input should be 'none', 'medvram' or 'lowvram'"),
        ("matrix:\n  backend: onnx\n", "bad.yaml: matrix.backend[0]: unknown backend 'onnx'"),
        ("matrix:\n  exclude:\n    - {dtyp: fp16}\n", "bad.yaml: matrix.exclude[0].dtyp: unknown key"),
        ("matrix:\n  steps: 0\n", "bad.yaml: matrix.steps[0]: Input should be greater than or equal to 1"),
        ("matrix: [1, 2\n", "bad.yaml: YAML syntax error at line 2"),
        ("- just\n- a list\n", "bad.yaml: <top level>: expected a mapping"),
    ],
)
def test_bad_files_give_one_clear_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write_scenario(tmp_path, text, "bad.yaml")
    with pytest.raises(UserError) as caught:
        expand(load_scenario(path))  # a backend name is checked at expansion
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path)), message
    assert expected in message.replace(str(tmp_path) + "/", ""), message


def test_missing_file() -> None:
    with pytest.raises(UserError, match="nope.yaml: no such scenario file"):
        load_scenario("nope.yaml")


def test_cli_exits_2_without_traceback(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, "matrix:\n  sampler: eulr\n", "bad.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "bad.yaml: matrix.sampler[0]: unknown sampler 'eulr'" in lines[0]
    assert not (tmp_path / "out").exists()
