"""The runner on the real tiny model through the diffusers backend (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backends import get_backend
from harness import expand, load, parse_scenario
from harness.execute import make_noise, request_for, resolve_device
from harness.measure import GenerationTimer
from harness.runner import Runner

CPU = torch.device("cpu")
TINY = {"model": "tiny", "device": "cpu", "resolution": 64, "steps": 3, "seed": 7}


def _cells(matrix: dict, **settings) -> list:
    data = {"name": "t", "repeats": 2, "warmup": 1, **settings, "matrix": TINY | matrix}
    return expand(parse_scenario(data, "t.yaml"))


def test_measurement_fields_present_and_positive(tmp_path: Path) -> None:
    runner = Runner(tmp_path, progress=False, isolate="none")
    results = runner.run(_cells({"batch": [1, 2]}))
    assert [r.status for r in results] == ["ok", "ok"]
    frame = load(tmp_path)
    assert len(frame) == 2
    for name in (
        "its",
        "denoise_its",
        "wall_s",
        "encode_s",
        "denoise_s",
        "decode_s",
        "step_ms_median",
        "step_ms_p10",
        "step_ms_p90",
        "first_call_s",
        "load_s",
        "cpu_peak_gb",
        "cpu_rss_sampled_gb",
    ):
        assert (frame[name] > 0).all(), name
    row = frame.iloc[1]
    assert row["batch"] == 2 and len(row["its_repeats"]) == 2
    # it/s is batch x steps / wall, per repeat, median reported
    assert row["its"] == pytest.approx(float(np.median([2 * 3 / w for w in row["wall_s_repeats"]])))
    assert row["denoise_its"] > row["its"]  # denoising alone is faster than the whole generation
    assert row["output_shape"] == [2, 64, 64, 3]
    assert row["output_finite"] and not row["output_constant"]
    assert (tmp_path / row["image"]).is_file()
    # one load served both batch sizes
    assert frame["load_s"].nunique() == 1
    assert frame["env.torch"].iloc[0] == torch.__version__


def _generate(seed: int, batch: int = 1, sampler: str = "euler"):
    cell = _cells({"seed": seed, "batch": batch, "sampler": sampler})[0]
    from models import resolve

    session = get_backend("diffusers").load(cell, resolve("tiny", "hub"), CPU)
    with GenerationTimer(CPU) as timer:
        return session.generate(request_for(cell, session), timer)


def test_txt2img_is_deterministic_for_a_seed() -> None:
    first, again, other = _generate(3), _generate(3), _generate(4)
    assert np.array_equal(first.images, again.images)
    assert torch.equal(first.latents, again.latents)
    assert np.abs(first.images - other.images).max() > 0.01
    ancestral = [_generate(5, sampler="euler_a").images for _ in range(2)]
    assert np.array_equal(*ancestral)


def test_noise_comes_from_the_seed_on_the_cpu() -> None:
    assert torch.equal(make_noise((1, 4, 8, 8), 1), make_noise((1, 4, 8, 8), 1))
    assert not torch.equal(make_noise((1, 4, 8, 8), 1), make_noise((1, 4, 8, 8), 2))


def test_a_failing_cell_does_not_stop_the_run(tmp_path: Path) -> None:
    cells = _cells(
        {
            "batch": [1],
            "include": [
                {"model": str(tmp_path / "missing.safetensors"), "source": "safetensors"},
                {"device": "cuda"},
                {"offload": "medvram"},
                {"sampler": "dpmpp_2s_a"},
                {"batch": 2},
            ],
        }
    )
    results = Runner(tmp_path, progress=False, isolate="none").run(cells)
    by_id = {r.cell.id: r for r in results}
    statuses = {r.cell.model if "missing" in r.cell.model else r.cell.id: r.status for r in results}
    assert list(statuses.values()).count("ok") == 2
    missing = next(r for r in results if "missing" in r.cell.model)
    assert missing.status == "error"
    assert "missing.safetensors" in missing.reason and "\n" not in missing.reason
    cuda = next(r for r in results if r.cell.device == "cuda")
    assert cuda.status == "unsupported" and "CUDA" in cuda.reason
    medvram = next(r for r in results if r.cell.offload == "medvram")
    assert medvram.status == "unsupported" and "medvram" in medvram.reason
    sampler = next(r for r in results if r.cell.sampler == "dpmpp_2s_a")
    assert sampler.status == "unsupported" and "dpmpp_2s_a" in sampler.reason
    assert len(load(tmp_path)) == len(cells) == len(by_id)


def test_timeout_is_recorded(tmp_path: Path) -> None:
    cells = _cells({"steps": 40}, timeout_s=0.001)
    result = Runner(tmp_path, progress=False, isolate="none").run(cells)[0]
    assert result.status == "timeout"
    assert "timeout" in result.reason


def test_device_resolution() -> None:
    assert resolve_device("cpu") == CPU
    expected = torch.device("cuda") if torch.cuda.is_available() else CPU
    assert resolve_device("auto") == expected
    if not torch.cuda.is_available():
        assert resolve_device("cuda") is None
