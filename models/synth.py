"""Deterministic random weights for the diffusers components of a zoo spec.

Every tensor draws from its own ``torch.Generator``, seeded from ``(spec.seed, component,
tensor name)`` through SHA-256, never from torch's global RNG. The weights are therefore the
same on every run and machine and do not depend on the order in which modules are built.
The modules are built on the meta device (no throw-away default initialisation), then the
synthetic tensors are assigned (:func:`synthesize`, for a model in memory) or streamed to disk
one at a time from their plan (:func:`synthetic_plan`; what the zoo does, so that writing even
the full-size SDXL holds one tensor at a time).

No tensor is zero. The original LDM code zero-initialises several output layers; a zero layer
makes outputs constant and every parity check vacuous.

Scales (per module type; ``fan_in`` = input features x kernel size):

================  =========================  ==========================
module            weight                     bias
================  =========================  ==========================
Linear / Conv     N(0, GAIN² / fan_in)       N(0, BIAS_STD²)
GroupNorm / LN    1 + N(0, NORM_STD²)        N(0, BIAS_STD²)
Embedding         N(0, EMBEDDING_STD²)       -
RMS norm (T5)     1 + N(0, NORM_STD²)        -
other parameters  N(0, EMBEDDING_STD²) for embeddings and offsets (CLIP's class token,
                  positions, the prior's CLIP mean); 1 + N(0, NORM_STD²) for the prior's
                  CLIP std
================  =========================  ==========================

Measured with these values (``txt2img`` sanity run, 20 euler steps, guidance 7.5, prompt
"a photograph of an astronaut riding a horse", fp32 and fp16 on this CPU):

- tiny, 64x64 px: UNet eps std 0.53-0.55 per pass; final latents std ≈ 19, finite;
  decoded image finite, std ≈ 0.26 in [0, 1], ≈ 11 % of pixels clipped (fp16 the same to
  3 digits).
- sd15, 64x64 px: UNet eps std 0.61-0.68 per pass; final latents std ≈ 24, finite;
  decoded image finite, std ≈ 0.28, ≈ 13 % clipped (fp16 the same to 3 digits).

The latents grow to std ≈ 20 because random eps does not denoise and guidance 7.5 amplifies
the prompt's (random) effect; every consumer normalises them (GroupNorm), so they stay finite.
(GroupNorm before every conv keeps each residual branch at ``GAIN x O(1)``, and the output
``norm_out -> silu -> conv_out`` of both UNet and VAE decoder puts the output std near
``0.6 x GAIN`` whatever the input scale, which is what keeps large guided latents decodable.)
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .specs import ModelSpec

#: Gain of Linear and Conv weights (1 = variance preserving for a unit-variance input).
GAIN = 1.0
#: Std of the noise around 1 of normalisation weights.
NORM_STD = 0.05
#: Std of every bias.
BIAS_STD = 0.02
#: Std of token and position embeddings (as CLIP's own initialisation).
EMBEDDING_STD = 0.02

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass
class Components:
    """The weighted components of a Stable Diffusion pipeline (SDXL's second text encoder,
    a ``CLIPTextModelWithProjection``, only for the ``sdxl`` family)."""

    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any = None

    def items(self) -> list[tuple[str, nn.Module]]:
        modules = [(name, getattr(self, name)) for name in COMPONENTS]
        return [(name, module) for name, module in modules if module is not None]


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from the spec seed and a tensor's qualified name (SHA-256)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seeded_normal(
    shape: torch.Size | tuple[int, ...], mean: float, std: float, seed: int, name: str
) -> torch.Tensor:
    """``N(mean, std²)`` in fp32 from a generator of its own, seeded by ``(seed, name)``."""
    generator = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name))
    tensor = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return tensor.mul_(std).add_(mean)


def init_scale(module: nn.Module, param: str, shape: torch.Size) -> tuple[float, float]:
    """``(mean, std)`` of the parameter ``param`` of ``module`` (see the table above)."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d)):
        if param == "bias":
            return 0.0, BIAS_STD
        fan_in = math.prod(shape[1:])
        return 0.0, GAIN / math.sqrt(fan_in)
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        return (1.0, NORM_STD) if param == "weight" else (0.0, BIAS_STD)
    if isinstance(module, nn.Embedding):
        return 0.0, EMBEDDING_STD
    if param in _SCALE_PARAMETERS or (param == "weight" and "Norm" in type(module).__name__):
        return 1.0, NORM_STD  # T5's RMS norm; the prior's std of CLIP image embeddings
    if param in _EMBEDDING_PARAMETERS:
        return 0.0, EMBEDDING_STD
    raise TypeError(f"no synthetic init for {type(module).__name__}.{param} {tuple(shape)}")


#: Parameters held by a module directly (not by a Linear / Conv / norm / Embedding) that
#: scale a signal: drawn around 1, as norm weights.
_SCALE_PARAMETERS = frozenset({"clip_std"})
#: Parameters held directly that are embeddings or offsets (CLIP's class token, the prior's
#: positional and prediction embeddings and CLIP mean, IF's attention-pooling positions).
_EMBEDDING_PARAMETERS = frozenset(
    {"class_embedding", "positional_embedding", "prd_embedding", "clip_mean"}
)


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor known by its shape and dtype before it is drawn (:func:`synthetic_plan`)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    draw: Callable[[], torch.Tensor]


def _draw(
    shape: tuple[int, ...], mean: float, std: float, seed: int, name: str, dtype: torch.dtype
) -> torch.Tensor:
    drawn = seeded_normal(shape, mean, std, seed, name)
    return drawn if dtype == torch.float32 else drawn.to(dtype)


def synthetic_plan(
    model: nn.Module, seed: int, component: str, dtype: torch.dtype = torch.float32
) -> dict[str, PlannedTensor]:
    """Every parameter of ``model`` (which may live on the meta device), in state-dict order,
    with the draw of its random values: what a writer needs to stream a component to disk one
    tensor at a time (:func:`models.convert.write_hub_folder`).

    Each tensor is drawn in fp32 and cast to ``dtype`` at once, so only one fp32 tensor
    exists at a time and the values are the fp32 model's, rounded.
    """
    plan: dict[str, PlannedTensor] = {}
    #: Tied parameters (T5's shared and encoder token embeddings) get the same values under
    #: each name, as the released checkpoints store them.
    planned: dict[int, PlannedTensor] = {}
    for module_name, module in model.named_modules():
        for param, value in module.named_parameters(recurse=False):
            name = f"{module_name}.{param}" if module_name else param
            if id(value) in planned:
                plan[name] = planned[id(value)]
                continue
            shape = tuple(value.shape)
            mean, std = init_scale(module, param, value.shape)
            plan[name] = planned[id(value)] = PlannedTensor(
                shape,
                dtype,
                functools.partial(_draw, shape, mean, std, seed, f"{component}.{name}", dtype),
            )
    return plan


def synthetic_state_dict(
    model: nn.Module, seed: int, component: str, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random values for every parameter of ``model`` (:func:`synthetic_plan`, all drawn)."""
    return {name: planned.draw() for name, planned in synthetic_plan(model, seed, component,
                                                                       dtype).items()}


def empty_components(spec: ModelSpec) -> Components:
    """The components of ``spec`` with parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_config(config: dict[str, Any]) -> CLIPTextConfig:
        return CLIPTextConfig(**{k: v for k, v in config.items() if k != "model_type"})

    with init_empty_weights():
        return Components(
            unet=UNet2DConditionModel.from_config(spec.unet),
            vae=AutoencoderKL.from_config(spec.vae),
            text_encoder=CLIPTextModel(text_config(spec.text_encoder)),
            text_encoder_2=(
                None if spec.text_encoder_2 is None
                else CLIPTextModelWithProjection(text_config(spec.text_encoder_2))
            ),
        )


def synthesize(spec: ModelSpec, seed: int | None = None) -> Components:
    """Build the components of ``spec`` with seeded random weights (CPU, eval mode), in the
    spec's ``weights_dtype`` (fp32, or fp16 for the ``-fp16`` twins).

    ``seed`` overrides ``spec.seed`` (tests use it to check that the seed matters).
    """
    seed = spec.seed if seed is None else seed
    dtype = getattr(torch, spec.weights_dtype)
    components = empty_components(spec)
    for name, model in components.items():
        state = synthetic_state_dict(model, seed, name, dtype)
        model.load_state_dict(state, strict=True, assign=True)
        model.eval()
    return components


def parameter_counts(components: Components) -> dict[str, int]:
    """Component name → number of parameters."""
    return {name: sum(p.numel() for p in model.parameters()) for name, model in components.items()}
