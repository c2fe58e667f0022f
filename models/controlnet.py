"""ControlNets of the zoo: synthesis per architecture and the two layouts they ship in.

A ControlNet is a trainable copy of the UNet's encoder half (``input_blocks`` and
``middle_block``), a small convolutional encoder of the control image (the *hint*) and one
1x1 "zero convolution" per skip connection plus one after the middle block; its outputs are
added to the UNet's skip connections and middle block, scaled per net.

- **Original single file** (``control_model.*``, the layout of the ControlNet 1.0 / 1.1
  releases as ``.safetensors``; the CompVis names of ``cldm/cldm.py``): ``time_embed.{0,2}``,
  ``input_hint_block.{0,2,…,14}`` (eight 3x3 convolutions with SiLU between them, three of
  stride 2: control images are at pixel resolution), ``input_blocks.N`` (the UNet's names),
  ``zero_convs.N.0``, ``middle_block.*``, ``middle_block_out.0``.
- **diffusers folder** (what ``ControlNetModel.from_pretrained`` reads): ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` with diffusers' names (``controlnet_cond_embedding``,
  ``down_blocks``, ``controlnet_down_blocks.N``, ``controlnet_mid_block``, …).

:data:`CONTROLNETS` are the zoo's nets, synthesised for a model spec's UNet (its widths,
levels, heads and context; always 4 latent input channels and a 3-channel RGB hint). Their
weights are seeded random values as every zoo tensor (:mod:`models.synth`), with **no zero
layer**: real ControlNets start their zero convolutions at zero, which would make every
check that the control changes the image vacuous. The zero convolutions are drawn at
:data:`ZERO_CONV_GAIN` so that a net moves the UNet's result by a fraction of its own size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .convert import PrefixMap, _convert, unet_prefix_map
from .specs import ModelSpec
from .synth import seeded_normal, synthetic_state_dict

#: Prefix of a ControlNet's tensors in an original single file.
CONTROL_PREFIX = "control_model."
#: Metadata key of the zoo's description of a ControlNet file (safetensors metadata).
CONTROLNET_METADATA_KEY = "sdbench_controlnet"
#: Channels of the hint encoder's stages (``cldm`` hard-codes them; diffusers'
#: ``conditioning_embedding_out_channels`` default).
HINT_CHANNELS: tuple[int, ...] = (16, 32, 96, 256)
#: Gain of the zero convolutions' weights (relative to a variance-preserving draw).
ZERO_CONV_GAIN = 0.25
#: Gain of the hint encoder's convolutions: SiLU keeps about 0.355 of a unit normal's second
#: moment, so with gain 1 the control image's trace fades below the biases over the eight
#: layers and another image changes the output by ~1e-3 (relative); at 1 / sqrt(0.355) the
#: signal keeps its size and another image moves the output as much as the net itself (~0.35).
HINT_GAIN = 1.68
#: The folder layout's weights file.
FOLDER_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class ControlNetRecipe:
    """A zoo ControlNet: what it stands for and the seed of its weights."""

    description: str
    seed: int


#: The zoo's ControlNets, for every architecture (named after the ControlNet 1.1 releases
#: whose shapes they have; the weights are random, so the name says nothing about content).
CONTROLNETS: dict[str, ControlNetRecipe] = {
    "canny": ControlNetRecipe("edge-map ControlNet (control_v11p_sd15_canny's shapes)", 101),
    "depth": ControlNetRecipe("depth-map ControlNet (control_v11f1p_sd15_depth's shapes)", 102),
}
#: The net ``workflow: controlnet`` uses when a cell names none.
DEFAULT_CONTROLNET = "canny"


def controlnet_config(spec: ModelSpec) -> dict[str, Any]:
    """The diffusers ``ControlNetModel`` config of a ControlNet for ``spec``'s UNet."""
    unet = spec.unet
    return {
        "_class_name": "ControlNetModel",
        "in_channels": 4,
        "conditioning_channels": 3,
        "flip_sin_to_cos": unet["flip_sin_to_cos"],
        "freq_shift": unet["freq_shift"],
        "down_block_types": list(unet["down_block_types"]),
        "mid_block_type": unet["mid_block_type"],
        "only_cross_attention": False,
        "block_out_channels": list(unet["block_out_channels"]),
        "layers_per_block": unet["layers_per_block"],
        "downsample_padding": unet["downsample_padding"],
        "mid_block_scale_factor": 1,
        "act_fn": unet["act_fn"],
        "norm_num_groups": unet["norm_num_groups"],
        "norm_eps": unet["norm_eps"],
        "cross_attention_dim": unet["cross_attention_dim"],
        "attention_head_dim": unet["attention_head_dim"],
        "use_linear_projection": unet.get("use_linear_projection", False),
        "conditioning_embedding_out_channels": list(HINT_CHANNELS),
        "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": False,
    }


def empty_controlnet(spec: ModelSpec) -> Any:
    """A ``ControlNetModel`` for ``spec`` with its parameters on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights():
        return ControlNetModel.from_config(controlnet_config(spec))


def synthesize_controlnet(spec: ModelSpec, name: str) -> Any:
    """The zoo ControlNet ``name`` for ``spec``: a diffusers ``ControlNetModel`` (CPU, eval
    mode) in ``spec.weights_dtype``, every tensor seeded by ``(recipe seed, name)``."""
    recipe = CONTROLNETS[name]
    dtype = getattr(torch, spec.weights_dtype)
    model = empty_controlnet(spec)
    state = synthetic_state_dict(model, recipe.seed, f"controlnet.{name}", dtype)
    for key, value in state.items():
        if not key.endswith(".weight"):
            continue
        gain = (
            ZERO_CONV_GAIN if _is_zero_conv(key)
            else HINT_GAIN if key.startswith("controlnet_cond_embedding.")
            else None
        )
        if gain is not None:
            fan_in = value[0].numel()
            drawn = seeded_normal(value.shape, 0.0, gain / fan_in**0.5, recipe.seed, f"gain.{key}")
            state[key] = drawn.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _is_zero_conv(key: str) -> bool:
    return key.startswith(("controlnet_down_blocks.", "controlnet_mid_block."))


# --------------------------------------------------------------------------- key mapping


def controlnet_prefix_map(config: dict[str, Any]) -> PrefixMap:
    """diffusers → ``cldm`` module prefixes of a ``ControlNetModel`` config."""
    levels = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    encoder_half = {
        **config,
        "up_block_types": ["UpBlock2D"] * levels,  # only the down half is kept below
    }
    pairs = [
        entry
        for entry in unet_prefix_map(encoder_half)
        if not entry[0].startswith(("up_blocks.", "conv_norm_out", "conv_out"))
    ]
    hint_stages = len(config["conditioning_embedding_out_channels"])
    pairs.append(("controlnet_cond_embedding.conv_in", "input_hint_block.0", {}))
    for block in range(2 * (hint_stages - 1)):
        pairs.append(
            (f"controlnet_cond_embedding.blocks.{block}", f"input_hint_block.{2 * block + 2}", {})
        )
    pairs.append(
        ("controlnet_cond_embedding.conv_out", f"input_hint_block.{4 * (hint_stages - 1) + 2}", {})
    )
    skips = 1 + levels * layers + (levels - 1)
    pairs += [(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0", {}) for i in range(skips)]
    pairs.append(("controlnet_mid_block", "middle_block_out.0", {}))
    return pairs


def controlnet_to_original(
    state: dict[str, torch.Tensor], config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet state dict under the original names (``control_model.*``)."""
    converted = _convert(state, controlnet_prefix_map(config), CONTROL_PREFIX)
    return {key: value.contiguous() for key, value in converted.items()}


def residual_count(config: dict[str, Any]) -> int:
    """How many residuals a ControlNet adds: one per skip connection, one for the middle."""
    levels = len(config["block_out_channels"])
    return 1 + levels * int(config["layers_per_block"]) + (levels - 1) + 1


# --------------------------------------------------------------------------- writing


def _metadata(spec: ModelSpec, name: str) -> dict[str, str]:
    return {
        "format": "pt",
        CONTROLNET_METADATA_KEY: json.dumps(
            {"name": name, "model": spec.name, "description": CONTROLNETS[name].description},
            sort_keys=True,
        ),
    }


def write_controlnet_file(spec: ModelSpec, name: str, path: Path) -> Path:
    """The zoo ControlNet ``name`` for ``spec`` as an original single file (``.safetensors``,
    ``control_model.*``)."""
    from safetensors.torch import save

    from .lora import sorted_header

    model = synthesize_controlnet(spec, name)
    state = controlnet_to_original(model.state_dict(), controlnet_config(spec))
    path.write_bytes(sorted_header(save(state, metadata=_metadata(spec, name))))
    return path


def write_controlnet_folder(spec: ModelSpec, name: str, path: Path) -> Path:
    """The zoo ControlNet ``name`` for ``spec`` as a diffusers ``ControlNetModel`` folder."""
    model = synthesize_controlnet(spec, name)
    model.save_pretrained(path, safe_serialization=True)
    return path


def write_controlnet_config(spec: ModelSpec, folder: Path) -> Path:
    """A folder with a ControlNet's ``config.json`` only (``from_single_file(config=...)``)."""
    empty_controlnet(spec).save_config(folder)
    return folder
