"""Writers of the two on-disk layouts of a Stable Diffusion model (SD 1.x, SD 2.x, SDXL).

- The **hub folder** (what ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
  ``.from_pretrained`` reads): ``model_index.json`` plus ``unet/``, ``vae/``,
  ``text_encoder/`` (SDXL also ``text_encoder_2/``; safetensors weights and ``config.json``),
  ``tokenizer/`` (and ``tokenizer_2/``) and ``scheduler/``. No safety checker or feature
  extractor: both are null in ``model_index.json`` and ``requires_safety_checker`` is false.
  :func:`write_hub_folder` streams each weights file a tensor at a time
  (:func:`stream_safetensors`).
- The **original single file** of the CompVis/LDM (sgm for SDXL) release:
  ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), the text encoders
  (``cond_stage_model.transformer.text_model.*`` for SD 1.x, ``cond_stage_model.model.*`` for
  SD 2.x, ``conditioner.embedders.{0,1}.*`` for SDXL) and, but for SDXL, the DDPM schedule
  buffers of ``LatentDiffusion``, as ``.safetensors`` (the spec as JSON in the metadata under
  :data:`SPEC_METADATA_KEY`) or ``.ckpt`` (a pickled dict ``{"state_dict", "sdbench_spec",
  "global_step"}`` that ``torch.load(weights_only=True)`` reads). :func:`write_single_file`
  converts a hub folder's memory-mapped tensors.

The key mapping ports diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``
and generalises its hard-coded four levels / two layers to any ``block_out_channels`` and
``layers_per_block``: it is derived from the component configs, as the inverse of diffusers'
``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .specs import ModelSpec
from .tokenizer import write_tokenizer

if TYPE_CHECKING:
    from .synth import PlannedTensor

#: Metadata key (safetensors) and dict key (ckpt) of the zoo spec, as JSON.
SPEC_METADATA_KEY = "sdbench_spec"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
#: SD 2.x: OpenCLIP's text tower (``FrozenOpenCLIPEmbedder.model``).
OPENCLIP_PREFIX = "cond_stage_model.model."
#: SDXL: sgm's ``GeneralConditioner``: CLIP ViT-L (``embedders.0``), OpenCLIP bigG
#: (``embedders.1``).
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SINGLE_FILE_SUFFIXES = {".safetensors": "safetensors", ".ckpt": "ckpt"}

# diffusers name → LDM name of the sub-modules of one resnet block.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}

# A prefix map: (diffusers prefix, LDM prefix, renames of the first names after the prefix).
PrefixMap = list[tuple[str, str, dict[str, str]]]


# --------------------------------------------------------------------------- key mapping


def unet_prefix_map(config: dict[str, Any]) -> PrefixMap:
    """diffusers → LDM module prefixes of a ``UNet2DConditionModel`` config."""
    levels = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    pairs: PrefixMap = [
        ("time_embedding.linear_1", "time_embed.0", {}),
        ("time_embedding.linear_2", "time_embed.2", {}),
        ("add_embedding.linear_1", "label_emb.0.0", {}),  # SDXL's adm vector MLP
        ("add_embedding.linear_2", "label_emb.0.2", {}),
        ("conv_in", "input_blocks.0.0", {}),
        ("conv_norm_out", "out.0", {}),
        ("conv_out", "out.2", {}),
        ("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
        ("mid_block.attentions.0", "middle_block.1", {}),
        ("mid_block.resnets.1", "middle_block.2", _UNET_RESNET),
    ]
    for level in range(levels):
        for layer in range(layers):
            index = 1 + level * (layers + 1) + layer
            pairs.append(
                (f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{index}.0", _UNET_RESNET)
            )
            pairs.append((f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{index}.1", {}))
        if level < levels - 1:
            index = 1 + level * (layers + 1) + layers
            pairs.append(
                (f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op", {})
            )
    up_types = config["up_block_types"]
    for level in range(levels):
        for layer in range(layers + 1):
            index = level * (layers + 1) + layer
            pairs.append(
                (f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{index}.0", _UNET_RESNET)
            )
            pairs.append((f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{index}.1", {}))
        if level < levels - 1:
            index = level * (layers + 1) + layers
            slot = 2 if up_types[level].startswith("CrossAttn") else 1
            pairs.append(
                (f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{index}.{slot}.conv", {})
            )
    return pairs


def vae_prefix_map(config: dict[str, Any]) -> PrefixMap:
    """diffusers → LDM module prefixes of an ``AutoencoderKL`` config."""
    levels = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    pairs: PrefixMap = [
        ("quant_conv", "quant_conv", {}),
        ("post_quant_conv", "post_quant_conv", {}),
    ]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.conv_in", f"{part}.conv_in", {}),
            (f"{part}.conv_out", f"{part}.conv_out", {}),
            (f"{part}.conv_norm_out", f"{part}.norm_out", {}),
            (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
            (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
            (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION),
        ]
    for level in range(levels):
        for layer in range(layers):
            pairs.append(
                (
                    f"encoder.down_blocks.{level}.resnets.{layer}",
                    f"encoder.down.{level}.block.{layer}",
                    _VAE_RESNET,
                )
            )
        if level < levels - 1:
            pairs.append(
                (
                    f"encoder.down_blocks.{level}.downsamplers.0.conv",
                    f"encoder.down.{level}.downsample.conv",
                    {},
                )
            )
    for level in range(levels):
        ldm_level = levels - 1 - level
        for layer in range(layers + 1):
            pairs.append(
                (
                    f"decoder.up_blocks.{level}.resnets.{layer}",
                    f"decoder.up.{ldm_level}.block.{layer}",
                    _VAE_RESNET,
                )
            )
        if level < levels - 1:
            pairs.append(
                (
                    f"decoder.up_blocks.{level}.upsamplers.0.conv",
                    f"decoder.up.{ldm_level}.upsample.conv",
                    {},
                )
            )
    return pairs


def _rename(key: str, prefixes: PrefixMap) -> str:
    """The LDM name of the diffusers ``key`` (longest matching prefix wins)."""
    best: tuple[str, str, dict[str, str]] | None = None
    for entry in prefixes:
        if key.startswith(entry[0] + ".") and (best is None or len(entry[0]) > len(best[0])):
            best = entry
    if best is None:
        raise KeyError(f"no original-layout name for diffusers key {key!r}")
    hf_prefix, ldm_prefix, renames = best
    rest = key[len(hf_prefix) + 1 :]
    for old, new in renames.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old) :]
            break
    return f"{ldm_prefix}.{rest}"


def unet_to_original_key(key: str, prefixes: PrefixMap) -> str:
    """The original name (without ``model.diffusion_model.``) of a diffusers UNet key, under
    :func:`unet_prefix_map`'s ``prefixes``."""
    return _rename(key, prefixes)


def _convert(
    state: dict[str, torch.Tensor], prefixes: PrefixMap, out_prefix: str
) -> dict[str, torch.Tensor]:
    converted = {out_prefix + _rename(key, prefixes): value for key, value in state.items()}
    if len(converted) != len(state):
        raise AssertionError(f"key mapping collided: {len(state)} keys became {len(converted)}")
    return converted


def unet_to_original(
    state: dict[str, torch.Tensor], config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict under the LDM names (``model.diffusion_model.*``)."""
    return _convert(state, unet_prefix_map(config), UNET_PREFIX)


def vae_to_original(
    state: dict[str, torch.Tensor], config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict under the LDM names (``first_stage_model.*``).

    The LDM mid-block attention uses 1x1 convolutions for q/k/v/proj_out, so those linear
    weights gain two trailing unit dimensions.
    """
    converted = _convert(state, vae_prefix_map(config), VAE_PREFIX)
    for key, value in converted.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            converted[key] = value[:, :, None, None]
    return converted


def clip_prefix(spec: ModelSpec) -> str:
    """Where the CLIP ViT-L text model lives in ``spec``'s single file (SD 1.x's
    ``cond_stage_model.transformer.``, SDXL's first embedder)."""
    return SDXL_CLIP_PREFIX if spec.family == "sdxl" else CLIP_PREFIX


def _clip_key(key: str, prefix: str) -> str:
    """The file key of a transformers ``CLIPTextModel`` key under ``prefix``.

    transformers ≥ 5.6 has no ``text_model.`` prefix; the original layout (and diffusers'
    detection of the CLIP weights in a single file) needs it, so it is added when absent.
    """
    return prefix + (key if key.startswith("text_model.") else "text_model." + key)


def text_encoder_to_original(
    state: dict[str, torch.Tensor], prefix: str = CLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict under ``cond_stage_model.transformer.*``
    (or another ``prefix``: :func:`clip_prefix`)."""
    return {_clip_key(key, prefix): value for key, value in state.items()}


# transformers CLIPTextModel name (after ``encoder.layers.N.``) → OpenCLIP resblock name
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def openclip_component(spec: ModelSpec) -> str:
    """The component that is OpenCLIP's text tower: SD 2.x's ``text_encoder``, SDXL's
    ``text_encoder_2``."""
    return "text_encoder_2" if spec.family == "sdxl" else "text_encoder"


def openclip_prefix(spec: ModelSpec) -> str:
    """Where OpenCLIP's text tower lives in ``spec``'s single file."""
    return SDXL_OPENCLIP_PREFIX if spec.family == "sdxl" else OPENCLIP_PREFIX


def openclip_text_to_original(
    state: dict[str, torch.Tensor], spec: ModelSpec
) -> dict[str, torch.Tensor]:
    """The OpenCLIP text tower's state dict (SD 2.x's ``CLIPTextModel``, SDXL's
    ``CLIPTextModelWithProjection``) in OpenCLIP's layout (``cond_stage_model.model.*``,
    SDXL ``conditioner.embedders.1.model.*``): q/k/v fused into ``attn.in_proj_weight`` /
    ``_bias``, the position embedding a bare ``positional_embedding`` tensor, SDXL's
    projection the transposed ``text_projection``; plus what the release carries and the
    conditioning never reads, drawn by :func:`openclip_unused_tensors`."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for (_component, key), slot in _openclip_slots(state, spec).items():  # one name map
        if slot.rows is None:
            out[slot.key] = state[key].T if slot.transposed else state[key]
        else:
            fused.setdefault(slot.key, []).append((slot.rows[0], state[key]))
    for key, parts in fused.items():  # q, k, v in the order of their rows
        out[key] = torch.cat([value for _start, value in sorted(parts, key=lambda p: p[0])])
    dtype = next(iter(state.values())).dtype
    unused = openclip_unused_tensors(spec, dtype)
    return out | {openclip_prefix(spec) + key: value for key, value in unused.items()}


def openclip_unused_tensors(spec: ModelSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What ``spec``'s single file holds of OpenCLIP beyond its hub folder, seeded as every zoo
    tensor (:mod:`models.synth`'s scales): ``logit_scale``; for SD 2.x also the last resblock
    and ``text_projection`` (the penultimate-layer conditioning never runs them)."""
    from .synth import BIAS_STD, GAIN, NORM_STD, seeded_normal

    if spec.family == "sdxl":
        return {"logit_scale": torch.tensor(4.6052).to(dtype)}
    width = int(spec.text_encoder["hidden_size"])
    inner = int(spec.text_encoder["intermediate_size"])
    last = f"transformer.resblocks.{spec.text_file_layers() - 1}."
    shapes = {
        "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
        "ln_1.weight": (width,), "ln_1.bias": (width,),
        "ln_2.weight": (width,), "ln_2.bias": (width,),
        "mlp.c_fc.weight": (inner, width), "mlp.c_fc.bias": (inner,),
        "mlp.c_proj.weight": (width, inner), "mlp.c_proj.bias": (width,),
    }
    tensors = {}
    for name, shape in shapes.items():
        if name.startswith("ln_"):
            mean, std = (1.0, NORM_STD) if name.endswith("weight") else (0.0, BIAS_STD)
        elif name.endswith("bias"):
            mean, std = 0.0, BIAS_STD
        else:
            mean, std = 0.0, GAIN / shape[1] ** 0.5
        tensors[last + name] = seeded_normal(shape, mean, std, spec.seed, f"openclip.{last}{name}")
    tensors["text_projection"] = seeded_normal(
        (width, width), 0.0, width**-0.5, spec.seed, "openclip.text_projection"
    )
    tensors["logit_scale"] = torch.tensor(4.6052)  # ln(100), as trained CLIP models end up
    return {key: value.to(dtype) for key, value in tensors.items()}


def ddpm_buffers(scheduler: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The schedule buffers ``LatentDiffusion.register_schedule`` stores in a checkpoint.

    Computed in float64 as the LDM code does, stored as float32. Only the ``scaled_linear``
    schedule of SD 1.x (``linear`` in LDM's naming) is supported.
    """
    if scheduler.get("beta_schedule") != "scaled_linear":
        raise ValueError(
            f"beta_schedule must be 'scaled_linear', got {scheduler.get('beta_schedule')!r}"
        )
    steps = int(scheduler["num_train_timesteps"])
    start, end = float(scheduler["beta_start"]), float(scheduler["beta_end"])
    betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, dim=0)
    cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    posterior_variance = betas * (1.0 - cumprod_prev) / (1.0 - cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": cumprod_prev,
        "sqrt_alphas_cumprod": cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / cumprod - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * cumprod_prev.sqrt() / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - cumprod_prev) * alphas.sqrt() / (1.0 - cumprod),
    }
    return {name: value.to(torch.float32) for name, value in buffers.items()}


def to_original_state_dict(
    spec: ModelSpec, states: dict[str, dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The single-file state dict of a model from its diffusers component state dicts."""
    # SGM's DiffusionEngine (SDXL) stores no schedule buffers; LDM's LatentDiffusion does
    state = {} if spec.family == "sdxl" else ddpm_buffers(spec.scheduler)
    state.update(unet_to_original(states["unet"], spec.unet))
    state.update(vae_to_original(states["vae"], spec.vae))
    if spec.family != "sd2":  # CLIP ViT-L: SD 1.x's text encoder, SDXL's first
        state.update(text_encoder_to_original(states["text_encoder"], clip_prefix(spec)))
    if spec.family != "sd1":  # OpenCLIP: SD 2.x's text encoder, SDXL's second
        state.update(openclip_text_to_original(states[openclip_component(spec)], spec))
    return {key: value.contiguous() for key, value in state.items()}


# --------------------------------------------------------------------------- single files


def single_file_format(path: Path) -> str | None:
    """``safetensors`` / ``ckpt`` from the suffix of ``path``; ``None`` for anything else."""
    return SINGLE_FILE_SUFFIXES.get(path.suffix.lower())


def save_single_file(state: dict[str, torch.Tensor], spec: ModelSpec, path: Path) -> Path:
    """Write an original-layout state dict as ``.safetensors`` or ``.ckpt`` (by suffix)."""
    spec_json = json.dumps(spec.to_dict(), sort_keys=True)
    fmt = single_file_format(path)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt", SPEC_METADATA_KEY: spec_json})
    elif fmt == "ckpt":
        torch.save({"state_dict": state, SPEC_METADATA_KEY: spec_json, "global_step": 0}, path)
    else:
        raise ValueError(f"single file must end in .safetensors or .ckpt, got {path.name!r}")
    return path


def load_ckpt(path: Path) -> dict[str, Any]:
    """A ``.ckpt`` as a dict, memory-mapped where the file allows it (``weights_only``)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (pre-zip) serialisation cannot be memory-mapped
        data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"expected a dict in {path.name}, found {type(data).__name__}")
    return data


def read_spec_metadata(path: Path) -> dict[str, Any] | None:
    """The zoo spec stored in a single file, or ``None`` when it has none."""
    if single_file_format(path) == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(SPEC_METADATA_KEY)
    else:
        text = load_ckpt(path).get(SPEC_METADATA_KEY)
    return json.loads(text) if isinstance(text, str) and text else None


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of a single file, without reading the tensors of a safetensors file."""
    if single_file_format(path) == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    data = load_ckpt(path)
    state = data.get("state_dict", data)
    return {
        key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)
    }


# --------------------------------------------------------------------------- hub folder


def model_index(spec: ModelSpec) -> dict[str, Any]:
    """``model_index.json`` of a hub folder (no safety checker, no feature extractor)."""
    import diffusers

    components: dict[str, Any] = {
        "scheduler": ["diffusers", spec.scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if spec.family == "sdxl":  # as stabilityai/stable-diffusion-xl-base-1.0 has it
        return {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": diffusers.__version__,
            "force_zeros_for_empty_prompt": True,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            **components,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        }
    inpaint = spec.unet["in_channels"] == 9  # as the public inpainting releases name it
    return {
        "_class_name": "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        **components,
    }


def write_config_folder(spec: ModelSpec, folder: Path, components: Any = None) -> Path:
    """A hub-layout folder with ``model_index.json``, component configs and the tokenizer(s).

    ``components`` (a :class:`~models.synth.Components`) defaults to meta-device modules:
    only their configs are written, no weights.
    """
    import diffusers

    from .synth import empty_components

    components = components if components is not None else empty_components(spec)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(model_index(spec), indent=2) + "\n")
    scheduler_cls = getattr(diffusers, spec.scheduler["_class_name"])
    scheduler_cls.from_config(spec.scheduler).save_pretrained(folder / "scheduler")
    write_tokenizer(spec, folder / "tokenizer")
    if spec.tokenizer_2 is not None:
        write_tokenizer(spec, folder / "tokenizer_2", spec.tokenizer_2)
    components.unet.save_config(folder / "unet")
    components.vae.save_config(folder / "vae")
    for name in spec.text_encoders:
        getattr(components, name).config.save_pretrained(folder / name)
    return folder


#: safetensors' dtype names (the format's header; https://github.com/huggingface/safetensors).
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}


def stream_safetensors(
    path: Path, tensors: Mapping[str, PlannedTensor], metadata: dict[str, str]
) -> Path:
    """Write a ``.safetensors`` file drawing one tensor at a time.

    The format's header (8-byte little-endian length, then JSON with each tensor's dtype,
    shape and byte range) needs only the planned shapes, so each tensor is drawn, written and
    dropped in turn: the peak is the largest tensor, not the model. safetensors' own writer
    takes every tensor at once; the file reads back with it like any other.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, planned in tensors.items():
        size = math.prod(planned.shape) * planned.dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[planned.dtype],
            "shape": list(planned.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, planned in tensors.items():
            value = planned.draw()
            if tuple(value.shape) != planned.shape or value.dtype != planned.dtype:
                raise AssertionError(f"{name}: drew {value.dtype} {tuple(value.shape)}, "
                                     f"planned {planned.dtype} {planned.shape}")
            handle.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return path


def component_weights_file(folder: Path, component: str) -> Path:
    """The safetensors weights of a hub folder's ``component`` (diffusers' or transformers'
    file name)."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from transformers.utils import SAFE_WEIGHTS_NAME

    name = SAFETENSORS_WEIGHTS_NAME if component in ("unet", "vae") else SAFE_WEIGHTS_NAME
    return folder / component / name


def write_hub_folder(spec: ModelSpec, folder: Path, seed: int | None = None) -> Path:
    """The full hub folder of ``spec`` with its seeded random weights (``seed`` overrides
    ``spec.seed``), each component's safetensors file streamed a tensor at a time in the
    spec's ``weights_dtype`` (:func:`~models.synth.synthetic_plan`): the tensors of
    :func:`~models.synth.synthesize`, without the model in memory."""
    from .synth import empty_components, synthetic_plan

    components = empty_components(spec)
    dtype = getattr(torch, spec.weights_dtype)
    for name in spec.text_encoders:  # as transformers' save_pretrained records it
        getattr(components, name).config.dtype = dtype
    write_config_folder(spec, folder, components)
    for name, model in components.items():
        plan = synthetic_plan(model, spec.seed if seed is None else seed, name, dtype)
        stream_safetensors(component_weights_file(folder, name), plan, {"format": "pt"})
    return folder


def read_hub_states(spec: ModelSpec, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's tensors of a hub folder written by :func:`write_hub_folder`,
    memory-mapped (safetensors reads lazily: nothing is copied into memory)."""
    from safetensors.torch import load_file

    return {name: load_file(str(component_weights_file(folder, name)))
            for name in spec.components}


def write_single_file(spec: ModelSpec, hub_folder: Path, path: Path) -> Path:
    """The original-layout single file of the hub folder ``hub_folder`` at ``path`` (suffix
    picks the format): the folder's memory-mapped tensors under their original names, so the
    file holds exactly the folder's weights and only the fused and transposed tensors are
    ever copied into memory."""
    return save_single_file(to_original_state_dict(spec, read_hub_states(spec, hub_folder)),
                            spec, path)


# --------------------------------------------------------------------------- reverse mapping


@dataclass(frozen=True)
class OriginalSlot:
    """Where a diffusers tensor of a spec lives in its original single file."""

    #: The single-file key.
    key: str
    #: The diffusers tensor's shape (the file's may differ: the VAE's 1x1-conv attention).
    shape: tuple[int, ...]
    #: Rows ``[start, stop)`` of the file's tensor that are this one (OpenCLIP's fused q/k/v
    #: in ``attn.in_proj_weight`` / ``_bias``); None for the whole tensor.
    rows: tuple[int, int] | None = None
    #: The file holds the transpose (OpenCLIP's ``text_projection``, applied as ``x @ P``).
    transposed: bool = False


def original_slots(spec: ModelSpec) -> dict[tuple[str, str], OriginalSlot]:
    """(component, diffusers key) → its :class:`OriginalSlot`, for every tensor of ``spec``.

    Derived from the forward mapping of :func:`to_original_state_dict` on meta-device
    modules (names and shapes only, no weights), so the two directions cannot disagree. The
    text encoder's diffusers keys are those of the installed transformers (flattened, without
    ``text_model.``, on transformers ≥ 5.6).
    """
    from .synth import empty_components

    components = empty_components(spec)
    slots: dict[tuple[str, str], OriginalSlot] = {}
    for component, model in components.items():
        state = model.state_dict()
        if spec.family != "sd1" and component == openclip_component(spec):
            slots.update(_openclip_slots(state, spec))
            continue
        if component == "unet":
            renamed = {key: UNET_PREFIX + _rename(key, unet_prefix_map(spec.unet)) for key in state}
        elif component == "vae":
            renamed = {key: VAE_PREFIX + _rename(key, vae_prefix_map(spec.vae)) for key in state}
        else:
            renamed = {key: _clip_key(key, clip_prefix(spec)) for key in state}
        for key, original in renamed.items():
            slots[(component, key)] = OriginalSlot(original, tuple(state[key].shape))
    return slots


def _openclip_slots(
    state: dict[str, torch.Tensor], spec: ModelSpec
) -> dict[tuple[str, str], OriginalSlot]:
    """The inverse of :func:`openclip_text_to_original`, key by key."""
    component = openclip_component(spec)
    config = spec.text_encoder_2 if component == "text_encoder_2" else spec.text_encoder
    assert config is not None
    width = int(config["hidden_size"])
    file_prefix = openclip_prefix(spec)
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    slots = {}
    for key, value in state.items():
        plain = key.removeprefix("text_model.")
        rows = None
        if plain == "text_projection.weight":  # SDXL's pooled projection, x @ P in OpenCLIP
            slots[(component, key)] = OriginalSlot(
                file_prefix + "text_projection", tuple(value.shape), transposed=True
            )
            continue
        if plain in fixed:
            original = fixed[plain]
        else:
            match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", plain)
            if match is None:
                raise AssertionError(f"text encoder key without an OpenCLIP name: {key}")
            layer, name, kind = match.groups()
            prefix = f"transformer.resblocks.{layer}."
            projection = re.fullmatch(r"self_attn\.([qkv])_proj", name)
            if projection is not None:
                index = "qkv".index(projection.group(1))
                original = f"{prefix}attn.in_proj_{kind}"
                rows = (index * width, (index + 1) * width)
            else:
                original = f"{prefix}{_OPENCLIP_LAYER[name]}.{kind}"
        slots[(component, key)] = OriginalSlot(file_prefix + original, tuple(value.shape), rows)
    return slots


def from_original_state_dict(
    spec: ModelSpec, state: dict[str, torch.Tensor]
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """The diffusers component state dicts of an original-layout state dict of ``spec``.

    Returns ``(states, missing)``: ``missing`` lists the original keys ``spec`` needs that
    ``state`` lacks. Keys ``spec`` has no use for (schedule buffers, EMA weights) are ignored.
    Tensors are reshaped to the diffusers shapes (the VAE's 1x1-conv attention → linear).
    """
    states: dict[str, dict[str, torch.Tensor]] = {name: {} for name in spec.components}
    missing: list[str] = []
    for (component, key), slot in original_slots(spec).items():
        value = state.get(slot.key)
        if value is None:
            if slot.key not in missing:
                missing.append(slot.key)
            continue
        if slot.rows is not None:
            value = value[slot.rows[0] : slot.rows[1]]
        if slot.transposed:
            value = value.T
        states[component][key] = value.reshape(slot.shape) if value.shape != slot.shape else value
    return states, missing
