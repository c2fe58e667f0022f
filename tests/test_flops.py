"""FLOPs of a step counted on the meta device, and MFU only where a peak is known."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.flops import PEAKS, peak_tflops, step_figures, unet_config_path, unet_step_flops
from models import resolve


@pytest.fixture(scope="module")
def tiny_config():
    model = resolve("tiny", "hub")
    path = unet_config_path(model.source, model.path, model.config_dir)
    assert path is not None
    return path


def _counted(module, *args) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*args)
    return int(counter.get_total_flops())


def test_meta_count_equals_both_backends_real_forwards(tiny_config) -> None:
    """The count without weights is what each backend's UNet really runs on the CPU."""
    from backends import get_backend
    from harness.matrix import expand
    from harness.scenario import Scenario

    meta = unet_step_flops(tiny_config, 2, 8, 8)
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 500.0)
    sessions = {}
    for backend, source in (("diffusers", "hub"), ("original", "safetensors")):
        scenario = Scenario.model_validate({"name": "f", "matrix": {
            "backend": backend, "model": "tiny", "source": source, "device": "cpu"}})
        (cell,) = expand(scenario)
        sessions[backend] = get_backend(backend).load(cell, resolve("tiny", source),
                                                      torch.device("cpu"))
    context = torch.randn(2, 77, json.loads(tiny_config.read_text())["cross_attention_dim"])
    # The CPU's fused attention kernel has no FLOP formula in the counter; the math kernels
    # (matmuls, as on the meta device) do.
    from diffusers.models.attention_processor import AttnProcessor

    from backends.original.attention import set_attention

    diffusers_unet = sessions["diffusers"].pipe.unet
    diffusers_unet.set_attn_processor(AttnProcessor())
    original_unet = sessions["original"].ldm.unet
    set_attention(original_unet, "math")
    assert _counted(lambda *a: diffusers_unet(*a, return_dict=False), x, t, context) == meta
    assert _counted(original_unet, x, t, context) == meta
    # the count scales with the latent area and the batch, as a convolutional UNet's must
    assert unet_step_flops(tiny_config, 4, 8, 8) == 2 * meta
    assert unet_step_flops(tiny_config, 2, 16, 16) > 3 * meta


def test_step_figures_mfu_only_with_a_known_peak(tiny_config) -> None:
    common = {"latent_shape": (2, 4, 8, 8), "guidance": 7.5, "steps": 10, "denoise_s": 0.5,
              "dtype": "fp16"}
    per_image = unet_step_flops(tiny_config, 2, 8, 8) / 1e12
    cpu = step_figures(tiny_config, device="cpu", gpu_name=None, **common)
    assert cpu["tflops_per_image_step"] == pytest.approx(per_image)
    assert cpu["achieved_tflops"] == pytest.approx(per_image * 2 * 10 / 0.5)
    assert cpu["mfu"] is None  # no peak for a CPU
    h100 = step_figures(tiny_config, device="cuda", gpu_name="NVIDIA H100 80GB HBM3", **common)
    assert h100["mfu_peak_tflops"] == 989.4
    assert h100["mfu"] == pytest.approx(h100["achieved_tflops"] / 989.4)
    unknown = step_figures(tiny_config, device="cuda", gpu_name="NVIDIA Quadro K600", **common)
    assert unknown["mfu"] is None and unknown["achieved_tflops"] is not None
    no_cfg = step_figures(tiny_config, device="cpu", gpu_name=None,
                          **{**common, "guidance": 1.0})
    assert no_cfg["tflops_per_image_step"] == pytest.approx(per_image / 2)
    assert step_figures(None, device="cpu", gpu_name=None, **common) == {}


@pytest.mark.parametrize(("name", "half", "fp32"), [
    ("NVIDIA H100 80GB HBM3", 989.4, 66.9),
    ("NVIDIA H100 PCIe", 756.5, 51.2),
    ("NVIDIA H200", 989.4, 66.9),
    ("NVIDIA A100-SXM4-80GB", 312.0, 19.5),
    ("NVIDIA L4", 121.0, 30.3),
    ("NVIDIA L40S", 362.05, 91.6),
    ("NVIDIA GeForce RTX 4090", 165.2, 82.6),
    ("NVIDIA GeForce RTX 3060", 25.6, 12.7),
])
def test_peak_table_matches_device_names(name: str, half: float, fp32: float) -> None:
    peak = peak_tflops(name)
    assert peak is not None and (peak.half, peak.fp32) == (half, fp32)
    assert peak.source  # every figure names where it comes from


def test_unknown_gpus_have_no_peak() -> None:
    assert peak_tflops("NVIDIA GeForce GTX 1080") is None
    assert peak_tflops(None) is None
    assert all(p.half > p.fp32 > 0 for p in PEAKS)
