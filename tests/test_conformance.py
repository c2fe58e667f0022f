"""Conformance checks and cross-backend parity, on synthetic outputs and on both backends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness import expand, parse_scenario
from harness.conformance import (
    PSNR_IDENTICAL,
    Check,
    ParityTracker,
    long_prompts,
    parity_key,
    psnr,
    relative_error,
    to_uint8,
)
from harness.runner import Runner, any_failed


def _cells(matrix: dict, **settings) -> list:
    base = {"model": "tiny", "device": "cpu", "resolution": 64, "steps": 4, "seed": 3}
    data = {"name": "c", "repeats": 1, "warmup": 0, **settings, "matrix": base | matrix}
    return expand(parse_scenario(data, "c.yaml"))


def _output(value: float, noise: float = 0.0) -> tuple[torch.Tensor, np.ndarray]:
    """Final latents and 8-bit images, as the runner hands them to the parity tracker."""
    latents = torch.full((1, 4, 8, 8), value) + noise * torch.arange(256.0).reshape(1, 4, 8, 8)
    images = np.full((1, 64, 64, 3), value / 2, dtype=np.float32)
    return latents, to_uint8(images)


def test_metrics() -> None:
    a = torch.tensor([3.0, 4.0])
    assert relative_error(a, a) == 0.0
    assert relative_error(torch.tensor([3.0, 4.5]), a) == pytest.approx(0.1)
    images = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    assert psnr(images, images) == PSNR_IDENTICAL
    brighter = images + 1
    assert psnr(brighter, images) == pytest.approx(20 * np.log10(255.0))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(images, images[:, :2])
    with pytest.raises(ValueError, match="status must be one of"):
        Check("ok", "x")


def test_parity_key_ignores_backend_and_source_only() -> None:
    cells = _cells({"backend": ["original", "diffusers"], "source": ["safetensors", "ckpt"],
                    "sampler": ["euler", "heun"]})
    keys = {parity_key(cell) for cell in cells}
    assert len(keys) == 2  # one per sampler


def test_parity_tracker_pairs_backends() -> None:
    original, diffusers = _cells({"backend": ["original", "diffusers"]})
    tracker = ParityTracker()
    tracker.plan([original, diffusers])
    assert tracker.record(original, *_output(1.0)) == {}
    same = tracker.record(diffusers, *_output(1.0))
    assert same["parity_ref"] == original.id and same["parity_status"] == "pass"
    assert same["parity_psnr_db"] == PSNR_IDENTICAL and same["parity_latent_rel_err"] == 0.0

    tracker = ParityTracker()
    tracker.record(original, *_output(1.0))
    far = tracker.record(diffusers, *_output(1.0, noise=0.01))
    assert far["parity_status"] == "differs" and far["parity_latent_rel_err"] > 1e-3
    assert "vs original" in far["parity_check"]["detail"]


def test_long_prompts_differ_only_in_their_tail() -> None:
    first, second = long_prompts("a cat")
    assert len(first.split()) > 85
    head = first.split()[:82]
    assert second.split()[:82] == head and first != second


@pytest.mark.parametrize("sampler", ["euler"])
def test_both_backends_conform_on_tiny(tmp_path: Path, sampler: str) -> None:
    cells = _cells(
        {"backend": ["original", "diffusers"], "source": "safetensors", "sampler": sampler},
        checks=["determinism", "semantics", "parity"],
    )
    results = Runner(tmp_path, progress=False, isolate="none").run(cells)
    original, diffusers = results
    assert original.status == diffusers.status == "ok"
    assert not any_failed(results)
    for result in results:
        checks = result.metrics["check_results"]
        assert checks["determinism"]["status"] == "pass"
        assert checks["long_prompt"]["status"] == "pass"
    assert "keeps long prompts" in original.metrics["check_results"]["long_prompt"]["detail"]
    assert "truncates at 77" in diffusers.metrics["check_results"]["long_prompt"]["detail"]
    # euler on 4 steps: both backends use the same sigmas, so they agree closely
    assert diffusers.metrics["parity_ref"] == original.cell.id
    assert diffusers.metrics["parity_latent_rel_err"] <= 1e-4
    assert diffusers.metrics["parity_psnr_db"] >= 40
    assert diffusers.metrics["check_results"]["parity"]["status"] == "pass"
