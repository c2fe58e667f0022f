"""FLOPs of a denoising step, counted without running the model, and MFU against GPU peaks.

- :func:`unet_step_flops`: the UNet's FLOPs for one call on a ``[batch, C, h, w]`` latent,
  counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no weights, no
  compute: the diffusers ``UNet2DConditionModel`` of the model's ``unet/config.json`` is built
  on ``meta`` and called once under the counter). Both backends run the same architecture, so
  one count serves both. Cached per (config, shape).
- :func:`step_figures`: a cell's ``tflops_per_image_step`` (one image's share of a step, CFG's
  doubled UNet batch included), ``achieved_tflops`` (that × batch × steps / the denoise time)
  and ``mfu`` (achieved over the GPU's dense peak for the dtype, :data:`PEAKS`), None where the
  peak is unknown — never a guess.

:data:`PEAKS` holds vendor datasheet figures, dense (without structured sparsity), in TFLOP/s:
half precision on the tensor cores with FP32 accumulation (what cuBLAS uses for fp16 / bf16
matmuls), and plain FP32 (no TF32: torch's default ``matmul.allow_tf32`` is off).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Peak:
    """A GPU's dense peaks (TFLOP/s) and where they come from."""

    pattern: str
    half: float
    fp32: float
    source: str


#: First match wins (``re.search`` on ``torch.cuda.get_device_name``, case-insensitive).
PEAKS: tuple[Peak, ...] = (
    Peak(r"H200", 989.4, 66.9, "NVIDIA H200 Tensor Core GPU datasheet (SXM; sparsity halved)"),
    Peak(r"H100.*PCIe", 756.5, 51.2, "NVIDIA H100 Tensor Core GPU datasheet (PCIe)"),
    Peak(r"H100", 989.4, 66.9, "NVIDIA H100 Tensor Core GPU datasheet (SXM; sparsity halved)"),
    Peak(r"A100", 312.0, 19.5, "NVIDIA A100 Tensor Core GPU datasheet"),
    Peak(r"L40S", 362.05, 91.6, "NVIDIA L40S datasheet (sparsity halved)"),
    Peak(r"\bL4\b", 121.0, 30.3, "NVIDIA L4 Tensor Core GPU datasheet (sparsity halved)"),
    Peak(r"RTX 4090", 165.2, 82.6,
         "NVIDIA Ada Lovelace architecture whitepaper, RTX 4090 (FP16 tensor, FP32 accumulate)"),
    Peak(r"RTX 3060", 25.6, 12.7,
         "NVIDIA Ampere GA10x architecture whitepaper, RTX 3060 (FP16 tensor, FP32 accumulate)"),
)
HALF_DTYPES = ("fp16", "bf16")


def peak_tflops(gpu_name: str | None) -> Peak | None:
    """The peak entry for this GPU, or None when the GPU is not in :data:`PEAKS`."""
    if not gpu_name:
        return None
    for peak in PEAKS:
        if re.search(peak.pattern, gpu_name, flags=re.IGNORECASE):
            return peak
    return None


def unet_config_path(source: str, path: Path, config_dir: Path | None) -> Path | None:
    """Where a resolved model keeps its diffusers UNet config (hub folder or config folder)."""
    folder = path if source == "hub" else config_dir
    if folder is None:
        return None
    candidate = Path(folder) / "unet" / "config.json"
    return candidate if candidate.is_file() else None


@lru_cache(maxsize=64)
def _count(config_json: str, shape: tuple[int, int, int, int], tokens: int) -> int:
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads(config_json)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        x = torch.empty(shape)
        t = torch.full((shape[0],), 500.0)
        context = torch.empty(shape[0], tokens, int(config["cross_attention_dim"]))
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            unet(x, t, encoder_hidden_states=context)
    return int(counter.get_total_flops())


def unet_step_flops(config_path: Path, batch: int, height: int, width: int,
                    tokens: int = 77) -> int:
    """FLOPs of one UNet call on ``batch`` latents of ``height × width`` (latent pixels)."""
    config = json.loads(Path(config_path).read_text())
    channels = int(config.get("in_channels", 4))
    return _count(json.dumps(config, sort_keys=True), (batch, channels, height, width), tokens)


def step_figures(
    config_path: Path | None,
    *,
    latent_shape: tuple[int, ...],
    guidance: float,
    steps: int,
    denoise_s: float | None,
    device: str,
    gpu_name: str | None,
    dtype: str,
) -> dict[str, Any]:
    """``tflops_per_image_step``, ``achieved_tflops``, ``mfu`` and ``mfu_peak_tflops`` of a
    cell; an empty dict where the count cannot be made (no UNet config)."""
    if config_path is None:
        return {}
    batch, _channels, height, width = latent_shape
    unet_batch = 2 if guidance > 1.0 else 1  # CFG: conditional and unconditional
    per_image = unet_step_flops(config_path, unet_batch, height, width) / 1e12
    figures: dict[str, Any] = {"tflops_per_image_step": per_image, "achieved_tflops": None,
                               "mfu": None, "mfu_peak_tflops": None}
    if denoise_s and denoise_s > 0:
        figures["achieved_tflops"] = per_image * batch * steps / denoise_s
    peak = peak_tflops(gpu_name) if device == "cuda" else None
    if peak is not None and figures["achieved_tflops"] is not None:
        value = peak.half if dtype in HALF_DTYPES else peak.fp32
        figures["mfu_peak_tflops"] = value
        figures["mfu"] = figures["achieved_tflops"] / value
    return figures
