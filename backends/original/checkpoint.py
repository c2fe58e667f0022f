"""Loading original single files (``.safetensors`` / ``.ckpt``) into a ``LatentDiffusion``.

- ``.safetensors`` is read with safetensors; ``.ckpt`` only with
  ``torch.load(weights_only=True)``: a pickle that needs more than tensors and plain containers
  (arbitrary classes, code) is refused with a message, never unpickled.
- Both layouts seen in the wild: the tensors at the top level, or under ``"state_dict"``
  (Lightning checkpoints, next to ``global_step`` and friends).
- The weights load with ``load_state_dict(strict=True)``; a file with missing or unexpected
  keys fails with a :class:`~harness.errors.UserError` listing a few of each. Keys the
  original also carries but inference does not use are set aside first: the DDPM schedule
  buffers (``alphas_cumprod`` is kept for the sampler), the EMA copy ``model_ema.*`` and
  CLIP's ``position_ids`` buffer of old transformers versions.
- transformers >= 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` level), while files
  carry ``cond_stage_model.transformer.text_model.*`` (SDXL:
  ``conditioner.embedders.0.transformer.text_model.*``): :func:`module_key` maps between them.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from harness.errors import UserError

#: DDPM buffers of LDM's ``LatentDiffusion`` (registered by ``register_schedule``).
SCHEDULE_KEYS: frozenset[str] = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "model_ema.decay",
        "model_ema.num_updates",
    }
)
#: Where a CLIP text model lives in an original file: SD 1.x's, SDXL's first text encoder.
CLIP_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
CLIP_PREFIX = CLIP_PREFIXES[0]
CLIP_TEXT_MODEL = CLIP_PREFIX + "text_model."
#: Metadata key (safetensors) / top-level key (ckpt) under which the zoo stores its spec.
SPEC_KEY = "sdbench_spec"


def _cast(key: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in ``dtype`` (floating-point weights only; the DDPM schedule stays as
    stored, since the sampler computes its sigmas from it in float32)."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    if key in SCHEDULE_KEYS:
        return tensor
    return tensor.to(dtype)


def read_checkpoint(
    path: Path, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The file's tensors (CPU; as stored, or cast to ``dtype`` one at a time as they are
    read, so an fp16 file loaded in fp32 never holds both copies) and the zoo spec it
    carries, if any."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if suffix == ".safetensors":
        from safetensors import safe_open

        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                tensors[key] = _cast(key, handle.get_tensor(key), dtype)
        spec = json.loads(metadata[SPEC_KEY]) if SPEC_KEY in metadata else None
        return tensors, spec
    if suffix == ".ckpt":
        tensors, spec = read_pickle(path)
        for key in list(tensors):
            tensors[key] = _cast(key, tensors[key], dtype)
        return tensors, spec
    raise UserError(f"checkpoint {path} must end in .safetensors or .ckpt, got {suffix!r}")


def read_pickle(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A pickled checkpoint's tensors (top level or under ``state_dict``) and its zoo spec,
    read with ``torch.load(weights_only=True)`` only."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        raise UserError(
            f"refusing to load {path}: the pickle needs more than tensors "
            f"(torch.load(weights_only=True) said: {first_line}); "
            "convert it to .safetensors or re-save only its state_dict"
        ) from None
    if not isinstance(data, Mapping):
        raise UserError(f"checkpoint {path} holds a {type(data).__name__}, not a dict of tensors")
    spec = data.get(SPEC_KEY)
    if isinstance(spec, str):
        spec = json.loads(spec)
    inner = data.get("state_dict", data)
    if not isinstance(inner, Mapping):
        raise UserError(f"checkpoint {path}: 'state_dict' is a {type(inner).__name__}, not a dict")
    tensors = {key: value for key, value in inner.items() if isinstance(value, torch.Tensor)}
    return tensors, spec if isinstance(spec, dict) else None


def module_key(file_key: str, flat_clip: bool) -> str:
    """A file key -> the :class:`LatentDiffusion` state-dict key."""
    for prefix in CLIP_PREFIXES if flat_clip else ():
        if file_key.startswith(prefix + "text_model."):
            return prefix + file_key[len(prefix + "text_model.") :]
    return file_key


def checkpoint_key(module_key_: str, flat_clip: bool) -> str:
    """A :class:`LatentDiffusion` state-dict key -> the file key (inverse of :func:`module_key`)."""
    for prefix in CLIP_PREFIXES if flat_clip else ():
        if module_key_.startswith(prefix):
            return prefix + "text_model." + module_key_[len(prefix) :]
    return module_key_


def _set_aside(key: str) -> bool:
    return (
        key in SCHEDULE_KEYS
        or key.startswith("model_ema.")
        or key.endswith("embeddings.position_ids")
    )


def _list(keys: list[str], shown: int = 5) -> str:
    more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def load_weights(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` of file tensors into ``model`` (a LatentDiffusion),
    assigning the file's tensors; a mismatch raises a :class:`UserError` naming the keys."""
    parts = model.text.parts() if hasattr(model, "text") else []
    clips = [part.transformer for part in parts if hasattr(part, "transformer")]
    # SD 1.x's and SDXL's CLIP (transformers >= 5.6 flattened it); OpenCLIP has its own names
    flat_clip = bool(clips) and not hasattr(clips[0], "text_model")
    state = {module_key(k, flat_clip): v for k, v in tensors.items() if not _set_aside(k)}
    expected = model.state_dict()
    missing = sorted(checkpoint_key(k, flat_clip) for k in expected.keys() - state.keys())
    unexpected = sorted(checkpoint_key(k, flat_clip) for k in state.keys() - expected.keys())
    wrong_shape = sorted(
        f"{checkpoint_key(k, flat_clip)} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_list(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_list(unexpected)})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} keys with other shapes ({_list(wrong_shape)})")
        raise UserError(
            f"{source} does not match the original SD layout of its architecture: "
            + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True, assign=True)


def load_latent_diffusion(
    path: Path,
    *,
    spec_name: str | None,
    config_dir: Path | None,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Build the :class:`LatentDiffusion` of the file's architecture and load its weights.

    The architecture is the zoo spec stored in the file (``sdbench_spec``), else
    ``spec_name``. The UNet and the autoencoder are built on the meta device and receive the
    file's tensors directly (no random initialisation of 860M parameters just to overwrite it).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from backends.original.ldm import DiffusionEngine, LatentDiffusion, linear_alphas_cumprod
    from backends.original.text import (
        FrozenCLIPEmbedder,
        FrozenOpenCLIPEmbedder,
        FrozenOpenCLIPEmbedder2,
        GeneralConditioner,
        OpenCLIPText,
    )
    from backends.original.unet import UNetConfig, UNetModel
    from backends.original.vae import AutoencoderConfig, AutoencoderKL
    from models.specs import ModelSpec, get_spec

    tensors, stored_spec = read_checkpoint(path, dtype)
    if stored_spec is not None:
        spec = ModelSpec.from_dict(stored_spec)
    elif spec_name is not None:
        spec = get_spec(spec_name)
    else:
        raise UserError(f"cannot tell the architecture of {path}: no sdbench_spec in the file")
    if config_dir is None:
        raise UserError(f"{path}: no config folder with a tokenizer for architecture {spec.name!r}")
    ldm = spec.ldm_config()

    def tokenizer(folder: str) -> Any:
        return CLIPTokenizer.from_pretrained(
            Path(config_dir) / folder, local_files_only=True, model_max_length=77
        )

    def openclip(cond: dict[str, Any]) -> OpenCLIPText:
        with torch.device("meta"):
            return OpenCLIPText(
                cond["vocab_size"], cond["width"], cond["layers"], cond["heads"],
                cond["intermediate"], cond["max_length"], cond.get("projection"),
            )

    def clip(layer_idx: int | None = None) -> FrozenCLIPEmbedder:
        text_config = CLIPTextConfig(
            **{k: v for k, v in spec.text_encoder.items()
               if k not in ("architectures", "model_type")}
        )
        return FrozenCLIPEmbedder(CLIPTextModel(text_config), tokenizer("tokenizer"), layer_idx)

    cond = ldm["cond_stage"]
    engine = LatentDiffusion
    if cond["kind"] == "sdxl":
        clip_config, openclip_config = cond["embedders"]
        engine = DiffusionEngine
        cond_stage: Any = GeneralConditioner(
            clip(clip_config["layer_idx"]),
            FrozenOpenCLIPEmbedder2(openclip(openclip_config), tokenizer("tokenizer_2")),
            ldm["unet"]["size_embed_dim"],
        )
    elif cond["kind"] == "openclip":
        cond_stage = FrozenOpenCLIPEmbedder(openclip(cond), tokenizer("tokenizer"))
    else:
        cond_stage = clip()
    alphas_cumprod = tensors.get("alphas_cumprod")
    if alphas_cumprod is None:
        alphas_cumprod = linear_alphas_cumprod(
            ldm["linear_start"], ldm["linear_end"], ldm["timesteps"]
        )
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.from_ldm(ldm["unet"]))
        first_stage = AutoencoderKL(AutoencoderConfig.from_ldm(ldm["first_stage"]))
    model = engine(
        unet, first_stage, cond_stage, ldm["scale_factor"], alphas_cumprod,
        parameterization=ldm["parameterization"],
    )
    load_weights(model, tensors, str(path))
    model.requires_grad_(False)
    return model.to(dtype).eval()
