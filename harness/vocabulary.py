"""The common vocabulary of scenario axes; each backend maps it to its own terms.

The sampler names are shared by every backend: the original backend implements them as
k-diffusion style functions, the diffusers backend maps them to schedulers. A backend that
has no equivalent for a name reports the cell ``unsupported``.
"""

from __future__ import annotations

from typing import Literal

#: Samplers without a sigma-schedule variant.
BASE_SAMPLERS: tuple[str, ...] = (
    "euler",
    "euler_a",
    "heun",
    "dpm_2",
    "dpm_2_a",
    "lms",
    "dpmpp_2m",
    "dpmpp_2s_a",
    "dpmpp_sde",
    "ddim",
    "deis",
    "unipc",
    "ddpm",
)
#: Samplers that also exist with the Karras et al. (2022) sigma schedule, spelled ``NAME_karras``.
KARRAS_CAPABLE: tuple[str, ...] = (
    "euler",
    "euler_a",
    "heun",
    "dpm_2",
    "dpm_2_a",
    "lms",
    "dpmpp_2m",
    "dpmpp_2s_a",
    "dpmpp_sde",
)
SAMPLERS: tuple[str, ...] = BASE_SAMPLERS + tuple(f"{name}_karras" for name in KARRAS_CAPABLE)


def split_sampler(name: str) -> tuple[str, bool]:
    """``"dpmpp_2m_karras"`` -> ``("dpmpp_2m", True)``; ``"euler"`` -> ``("euler", False)``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    if name.endswith("_karras"):
        return name[: -len("_karras")], True
    return name, False


Backend = str  # validated against the backend registry, which may grow
Source = Literal["hub", "safetensors", "ckpt"]
Workflow = Literal[
    "txt2img", "img2img", "inpaint", "outpaint", "hires",
    "controlnet", "controlnet_img2img", "controlnet_inpaint",
]
#: The ControlNet workflows, by the workflow each adds the control to (DESIGN.md: ControlNet
#: is a workflow extension; the harness hands a backend the base workflow plus the controls).
CONTROLNET_WORKFLOWS: dict[str, str] = {
    "controlnet": "txt2img",
    "controlnet_img2img": "img2img",
    "controlnet_inpaint": "inpaint",
}
#: How ControlNets meet classifier-free guidance, by A1111's ControlNet extension's names.
CONTROL_MODES: dict[str, str] = {
    "balanced": "Balanced: the control on the conditional and the unconditional pass alike",
    "prompt": "My prompt is more important: residual i of K scaled by 0.825^(K-1-i)",
    "controlnet": (
        "ControlNet is more important: as prompt, and on the conditional pass only "
        "(guess mode)"
    ),
}
ControlMode = Literal["balanced", "prompt", "controlnet"]
DType = Literal["fp32", "fp16", "bf16"]
Offload = Literal["none", "medvram", "lowvram"]
#: What the UNet predicts: ``auto`` (the model's own config; for an SD 2.x file without
#: sdbench metadata, A1111's test), or ``eps`` / ``v`` declared.
Prediction = Literal["auto", "eps", "v"]
Compile = Literal["none", "default", "reduce-overhead", "max-autotune"]
Attention = Literal["sdp", "math", "xformers"]
Device = Literal["auto", "cpu", "cuda"]
Status = Literal["ok", "error", "oom", "timeout", "crashed", "unsupported"]

#: A cell's outcome (docs/results.md): ``crashed`` = the worker process died in the cell
#: (a signal, a non-zero exit, a broken pipe) without reporting it.
STATUSES: tuple[str, ...] = ("ok", "error", "oom", "timeout", "crashed", "unsupported")
FAILED_STATUSES: frozenset[str] = frozenset({"error", "oom", "timeout", "crashed"})

#: The network types of LoRA files (kohya / LyCORIS layouts), in the order reports list
#: them, with what tells each apart (``models.lora.network_type`` decides it from a file).
NETWORK_TYPES: dict[str, str] = {
    "lora": "LoRA: lora_down / lora_up on linear layers (and the transformers' 1x1 projections)",
    "locon": "LoCon: LoRA on the ResNet convolutions too (a 4-D lora_down with a k x k kernel)",
    "loha": "LoHa: the Hadamard product of two low-rank pairs (hada_w1_a/b, hada_w2_a/b)",
    "lokr": "LoKr: a Kronecker product (lokr_w1 and lokr_w2, or their _a / _b factors)",
    "dora": "DoRA: a LoRA with weight-decomposed magnitudes (dora_scale)",
}

#: What the long-prompt conformance check observed (its ``finding``): tokens past 77 change
#: the output (``keeps``) or change nothing (``truncates``).
KEEPS, TRUNCATES = "keeps", "truncates"
