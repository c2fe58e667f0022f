"""Architecture specs of the zoo: one spec per model, both configs derived from it.

A :class:`ModelSpec` holds the diffusers configs of a Stable Diffusion 1.x model (UNet, VAE,
CLIP text encoder, tokenizer, scheduler). The original (CompVis/LDM) configuration is derived
from the same spec by :meth:`ModelSpec.ldm_config`, so the two layouts cannot disagree about,
say, which UNet levels carry attention (a mismatch shows up only as missing keys at load).

``sd15`` has the shapes of the public Stable Diffusion 1.5 release (860M-parameter UNet,
CLIP ViT-L/14 text encoder, KL-f8 VAE). ``tiny`` keeps the same structure (f8 VAE, attention
on the first UNet level and in the middle, GroupNorm of 32) at widths that run in
milliseconds on a CPU; its widths are multiples of 32 because the original modules
hard-code 32 normalisation groups. ``tiny-inpaint`` / ``sd15-inpaint`` are the same with the
9-channel UNet input of the inpainting releases. Every model has an fp16 twin (``tiny-fp16``,
``sd15-fp16``, …): the same weights stored in fp16, for fp16 runs (half the disk and memory
to synthesise and load).

Families (:data:`FAMILIES`): ``sd1`` (the above) and ``sd2`` — ``sd21`` has the shapes of
Stable Diffusion 2.1 768-v (865M UNet with 64-channel heads, linear transformer projections and
a 1024-wide context; OpenCLIP ViT-H/14's text tower, conditioned on its penultimate layer;
v-prediction; the same KL-f8 VAE), ``tiny-sd21`` the same structure at test widths. The hub
folder of an SD 2.x model holds the text tower without its last layer, as the public release
does (diffusers' ``CLIPTextModel`` then yields the penultimate layer's states through the final
layer norm); the original single file holds all of OpenCLIP's layers
(``cond_stage_model.model.*``, :meth:`ModelSpec.text_file_layers`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

#: Bumped whenever synthesis changes in a way that changes the written tensors.
ZOO_FORMAT_VERSION = 1
#: Storage dtypes of synthesised weights (torch's names: ``getattr(torch, name)``).
WEIGHTS_DTYPES: tuple[str, ...] = ("float32", "float16")
#: Suffix of the zoo name of a spec's fp16 twin (``sd15-fp16``).
FP16_SUFFIX = "-fp16"
#: Model families: what each conditions on and how its original single file is laid out.
FAMILIES: dict[str, str] = {
    "sd1": "SD 1.x: CLIP ViT-L/14's last layer, eps-prediction (cond_stage_model.transformer.*)",
    "sd2": (
        "SD 2.x: OpenCLIP ViT-H/14's penultimate layer, v-prediction for 768-v "
        "(cond_stage_model.model.*)"
    ),
    "sdxl": (
        "SDXL: CLIP ViT-L and OpenCLIP ViT-bigG penultimate layers side by side, bigG's "
        "pooled projection and size/crop embeddings as the UNet's vector "
        "(conditioner.embedders.{0,1}.*)"
    ),
}


#: sdbench's prediction names -> diffusers schedulers' ``prediction_type``.
PREDICTION_TYPES: dict[str, str] = {"eps": "epsilon", "v": "v_prediction"}


@dataclass(frozen=True)
class ModelSpec:
    """A zoo model: diffusers component configs plus synthesis settings."""

    name: str
    description: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any]
    #: Seed of the random weights; every tensor draws from a generator derived from it.
    seed: int = 0
    #: Hub-style repo id under which the zoo places the model in a local HF cache.
    repo_id: str = ""
    tokenizer: dict[str, Any] = field(default_factory=dict)
    #: The torch dtype the weights are stored in (``float32``; ``float16`` for the ``-fp16``
    #: twins). Every tensor is drawn in fp32 from its own generator and cast at once, so a
    #: twin holds its fp32 model's weights rounded, and no fp32 copy of it is ever built.
    weights_dtype: str = "float32"
    #: :data:`FAMILIES`.
    family: str = "sd1"
    #: SDXL's second text encoder (a ``CLIPTextModelWithProjection``) and its tokenizer.
    text_encoder_2: dict[str, Any] | None = None
    tokenizer_2: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise ValueError(
                f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {self.weights_dtype!r}"
            )
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if (self.family == "sdxl") != (self.text_encoder_2 is not None):
            raise ValueError("text_encoder_2 is SDXL's and SDXL's only")

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """The text-encoder components: ``text_encoder`` (and SDXL's ``text_encoder_2``)."""
        return ("text_encoder", "text_encoder_2") if self.text_encoder_2 else ("text_encoder",)

    @property
    def components(self) -> tuple[str, ...]:
        """The weighted components, in the order the zoo draws and writes them."""
        return ("unet", "vae", *self.text_encoders)

    @property
    def prediction(self) -> str:
        """``eps`` or ``v``: what the UNet predicts (the scheduler's ``prediction_type``)."""
        return "v" if self.scheduler.get("prediction_type") == PREDICTION_TYPES["v"] else "eps"

    def text_file_layers(self) -> int:
        """Text-encoder layers in the original single file: the hub's, plus for SD 2.x the
        last OpenCLIP layer, which the penultimate-layer conditioning never runs."""
        layers = int(self.text_encoder["num_hidden_layers"])
        return layers + 1 if self.family == "sd2" else layers

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "description": self.description,
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "scheduler": self.scheduler,
            "tokenizer": self.tokenizer,
            "seed": self.seed,
            "repo_id": self.repo_id,
            "zoo_format_version": ZOO_FORMAT_VERSION,
        }
        if self.weights_dtype != "float32":  # fp32 specs keep their fingerprints and caches
            data["weights_dtype"] = self.weights_dtype
        if self.family != "sd1":  # so do the SD 1.x specs
            data["family"] = self.family
        if self.text_encoder_2 is not None:
            data["text_encoder_2"] = self.text_encoder_2
            data["tokenizer_2"] = self.tokenizer_2
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        fields_ = {k: v for k, v in data.items() if k != "zoo_format_version"}
        return cls(**fields_)

    def fingerprint(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae["block_out_channels"]) - 1))

    @property
    def latent_channels(self) -> int:
        return int(self.vae["latent_channels"])

    def ldm_config(self) -> dict[str, Any]:
        """The original LDM configuration (as in ``v1-inference.yaml``) of this spec."""
        unet, vae, text = self.unet, self.vae, self.text_encoder
        widths = list(unet["block_out_channels"])
        base = widths[0]
        if any(width % base for width in widths):
            raise ValueError(f"UNet widths must be multiples of the first, got {widths}")
        attention_levels = [
            2**level
            for level, kind in enumerate(unet["down_block_types"])
            if kind.startswith("CrossAttn")
        ]
        heads = unet["attention_head_dim"]
        vae_widths = list(vae["block_out_channels"])
        extra: dict[str, Any] = {}
        if self.family in ("sd2", "sdxl"):  # heads of 64 channels everywhere (num_head_channels)
            heads_list = [heads] * len(widths) if isinstance(heads, int) else list(heads)
            head_options: dict[str, Any] = {
                "num_heads": -1, "num_head_channels": widths[-1] // heads_list[-1]
            }
        if self.family == "sd2":
            cond_stage: dict[str, Any] = _openclip_stage(text, self.text_file_layers())
            cond_stage["layer"] = "penultimate"
        elif self.family == "sdxl":
            assert self.text_encoder_2 is not None
            text_2 = self.text_encoder_2
            cond_stage = {
                "kind": "sdxl",
                "embedders": [
                    {"kind": "clip", "hidden_size": text["hidden_size"],
                     "max_length": text["max_position_embeddings"], "layer": "hidden",
                     "layer_idx": int(text["num_hidden_layers"]) - 1},
                    {**_openclip_stage(text_2, int(text_2["num_hidden_layers"])),
                     "layer": "penultimate", "projection": text_2["projection_dim"]},
                ],
            }
            depths = unet["transformer_layers_per_block"]
            extra = {
                "transformer_depth": list(depths),
                "transformer_depth_middle": depths[-1],
                "adm_in_channels": unet["projection_class_embeddings_input_dim"],
                "num_classes": "sequential",
                "size_embed_dim": unet["addition_time_embed_dim"],
            }
        else:
            head_options = {"num_heads": heads if isinstance(heads, int) else list(heads)[0]}
            cond_stage = {
                "kind": "clip",
                "hidden_size": text["hidden_size"],
                "max_length": text["max_position_embeddings"],
                "layer": "last",
            }
        return {
            "unet": {
                "image_size": unet["sample_size"],
                "in_channels": unet["in_channels"],
                "out_channels": unet["out_channels"],
                "model_channels": base,
                "attention_resolutions": sorted(attention_levels, reverse=True),
                "num_res_blocks": unet["layers_per_block"],
                "channel_mult": [width // base for width in widths],
                **head_options,
                "use_spatial_transformer": True,
                "transformer_depth": 1,
                "context_dim": unet["cross_attention_dim"],
                "use_linear_in_transformer": bool(unet.get("use_linear_projection", False)),
                "legacy": False,
                **extra,
            },
            "first_stage": {
                "embed_dim": vae["latent_channels"],
                "double_z": True,
                "z_channels": vae["latent_channels"],
                "resolution": vae["sample_size"],
                "in_channels": vae["in_channels"],
                "out_ch": vae["out_channels"],
                "ch": vae_widths[0],
                "ch_mult": [width // vae_widths[0] for width in vae_widths],
                "num_res_blocks": vae["layers_per_block"],
                "attn_resolutions": [],
                "dropout": 0.0,
            },
            "cond_stage": cond_stage,
            "scale_factor": vae["scaling_factor"],
            "linear_start": self.scheduler["beta_start"],
            "linear_end": self.scheduler["beta_end"],
            "timesteps": self.scheduler["num_train_timesteps"],
            "parameterization": self.prediction,
        }


def _openclip_stage(text: dict[str, Any], layers: int) -> dict[str, Any]:
    """The ``cond_stage`` entry of an OpenCLIP text tower of ``layers`` resblocks."""
    return {
        "kind": "openclip",
        "width": text["hidden_size"],
        "heads": text["num_attention_heads"],
        "layers": layers,
        "intermediate": text["intermediate_size"],
        "max_length": text["max_position_embeddings"],
        "vocab_size": text["vocab_size"],
    }


_SD1_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "trained_betas": None,
}


def _unet(
    widths: tuple[int, ...],
    attention: tuple[bool, ...],
    layers: int,
    heads: int | list[int],
    context: int,
    sample_size: int,
    in_channels: int = 4,
    linear: bool = False,
    upcast: bool = False,
    depths: tuple[int, ...] | None = None,
    size_embed: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config; ``depths``: transformer blocks per level (SDXL),
    ``size_embed``: SDXL's (``addition_time_embed_dim``, pooled text width)."""
    sdxl: dict[str, Any] = {}
    if depths is not None:
        sdxl["transformer_layers_per_block"] = list(depths)
    if size_embed is not None:
        time_dim, pooled = size_embed
        sdxl |= {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_dim,
            "projection_class_embeddings_input_dim": pooled + 6 * time_dim,
        }
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": 4,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": list(widths),
        "layers_per_block": layers,
        "attention_head_dim": heads,
        "cross_attention_dim": context,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "center_input_sample": False,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "use_linear_projection": linear,
        **({"upcast_attention": True} if upcast else {}),
        **sdxl,
    }


def _vae(widths: tuple[int, ...], layers: int, sample_size: int) -> dict[str, Any]:
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "block_out_channels": list(widths),
        "layers_per_block": layers,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": 0.18215,
    }


def _clip(
    vocab: int, hidden: int, intermediate: int, layers: int, heads: int
) -> dict[str, Any]:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": 1,
    }


_SD2_V_SCHEDULER: dict[str, Any] = {**_SD1_SCHEDULER, "prediction_type": PREDICTION_TYPES["v"]}
#: The SDXL base release's scheduler (the same betas as SD 1.x, Euler, "leading" spacing).
_SDXL_SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
    "trained_betas": None,
    # the release's config carries these for the schedulers it is swapped for (DDIM's
    # defaults would clip x0 and set alpha_0 to one)
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "sample_max_value": 1.0,
}


def _sdxl_vae(widths: tuple[int, ...], layers: int, sample_size: int) -> dict[str, Any]:
    """SDXL's KL-f8 VAE: SD's structure, its own latent scale, upcast to fp32 by diffusers."""
    return {**_vae(widths, layers, sample_size), "scaling_factor": 0.13025, "force_upcast": True}


def _openclip_text(
    vocab: int, hidden: int, intermediate: int, layers: int, heads: int
) -> dict[str, Any]:
    """OpenCLIP's text tower as diffusers' SD 2.x ``CLIPTextModel`` holds it: GELU, and
    ``layers`` = OpenCLIP's layers less the last (the penultimate layer's output)."""
    return {**_clip(vocab, hidden, intermediate, layers, heads), "hidden_act": "gelu"}


def _openclip_projected(
    vocab: int, hidden: int, intermediate: int, layers: int, heads: int, projection: int
) -> dict[str, Any]:
    """SDXL's OpenCLIP ViT-bigG text tower as a ``CLIPTextModelWithProjection``: all its
    layers (the last one feeds the pooled projection)."""
    return {
        **_openclip_text(vocab, hidden, intermediate, layers, heads),
        "architectures": ["CLIPTextModelWithProjection"],
        "projection_dim": projection,
    }


SPECS: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        name="tiny",
        description="SD 1.x structure at test widths (UNet 32/64, VAE f8, CLIP 2x32); CPU ms",
        unet=_unet((32, 64), (True, False), layers=1, heads=4, context=32, sample_size=8),
        vae=_vae((32, 32, 64, 64), layers=1, sample_size=64),
        text_encoder=_clip(vocab=1000, hidden=32, intermediate=64, layers=2, heads=4),
        scheduler=_SD1_SCHEDULER,
        tokenizer={"vocab_size": 1000, "model_max_length": 77},
        seed=0,
        repo_id="sdbench/tiny",
    ),
    "sd15": ModelSpec(
        name="sd15",
        description="Stable Diffusion 1.5 shapes: 860M UNet, CLIP ViT-L/14, KL-f8 VAE",
        unet=_unet(
            (320, 640, 1280, 1280),
            (True, True, True, False),
            layers=2,
            heads=8,
            context=768,
            sample_size=64,
        ),
        vae=_vae((128, 256, 512, 512), layers=2, sample_size=512),
        text_encoder=_clip(vocab=49408, hidden=768, intermediate=3072, layers=12, heads=12),
        scheduler=_SD1_SCHEDULER,
        tokenizer={"vocab_size": 49408, "model_max_length": 77},
        seed=0,
        repo_id="sdbench/sd15",
    ),
    "tiny-sd21": ModelSpec(
        name="tiny-sd21",
        description=(
            "SD 2.x structure at test widths (UNet 32/64 with 8-channel heads and linear "
            "projections, OpenCLIP-style text 3x32 run to its penultimate layer, v-prediction)"
        ),
        unet=_unet((32, 64), (True, False), layers=1, heads=[4, 8], context=32, sample_size=8,
                   linear=True),
        vae=_vae((32, 32, 64, 64), layers=1, sample_size=64),
        text_encoder=_openclip_text(vocab=1000, hidden=32, intermediate=64, layers=2, heads=4),
        scheduler=_SD2_V_SCHEDULER,
        tokenizer={"vocab_size": 1000, "model_max_length": 77, "pad_token": "!"},
        seed=0,
        repo_id="sdbench/tiny-sd21",
        family="sd2",
    ),
    "sd21": ModelSpec(
        name="sd21",
        description=(
            "Stable Diffusion 2.1 768-v shapes: 865M UNet (64-channel heads, linear "
            "projections, context 1024), OpenCLIP ViT-H/14 text (penultimate), v-prediction"
        ),
        unet=_unet(
            (320, 640, 1280, 1280),
            (True, True, True, False),
            layers=2,
            heads=[5, 10, 20, 20],
            context=1024,
            sample_size=96,
            linear=True,
            upcast=True,
        ),
        vae=_vae((128, 256, 512, 512), layers=2, sample_size=768),
        text_encoder={
            **_openclip_text(vocab=49408, hidden=1024, intermediate=4096, layers=23, heads=16),
            "projection_dim": 1024,
        },
        scheduler=_SD2_V_SCHEDULER,
        tokenizer={"vocab_size": 49408, "model_max_length": 77, "pad_token": "!"},
        seed=0,
        repo_id="sdbench/sd21",
        family="sd2",
    ),
    "tiny-sdxl": ModelSpec(
        name="tiny-sdxl",
        description=(
            "SDXL structure at test widths (UNet 32/64/64, no attention on the first level, "
            "transformer depths 1/2, CLIP 2x32 + OpenCLIP-style 3x64 with pooled projection, "
            "size/crop embeddings)"
        ),
        unet=_unet((32, 64, 64), (False, True, True), layers=1, heads=[4, 8, 8], context=96,
                   sample_size=8, linear=True, depths=(1, 1, 2), size_embed=(8, 64)),
        vae=_sdxl_vae((32, 32, 64, 64), layers=1, sample_size=64),
        text_encoder=_clip(vocab=1000, hidden=32, intermediate=64, layers=2, heads=4),
        text_encoder_2=_openclip_projected(
            vocab=1000, hidden=64, intermediate=128, layers=3, heads=4, projection=64
        ),
        scheduler=_SDXL_SCHEDULER,
        tokenizer={"vocab_size": 1000, "model_max_length": 77},
        tokenizer_2={"vocab_size": 1000, "model_max_length": 77, "pad_token": "!"},
        seed=0,
        repo_id="sdbench/tiny-sdxl",
        family="sdxl",
    ),
    "sdxl": ModelSpec(
        name="sdxl",
        description=(
            "SDXL base 1.0 shapes: 2.6B UNet (transformer depths 0/2/10, context 2048, "
            "adm 2816), CLIP ViT-L + OpenCLIP ViT-bigG/14 with pooled projection, KL-f8 VAE"
        ),
        unet=_unet(
            (320, 640, 1280),
            (False, True, True),
            layers=2,
            heads=[5, 10, 20],
            context=2048,
            sample_size=128,
            linear=True,
            depths=(1, 2, 10),
            size_embed=(256, 1280),
        ),
        vae=_sdxl_vae((128, 256, 512, 512), layers=2, sample_size=1024),
        text_encoder=_clip(vocab=49408, hidden=768, intermediate=3072, layers=12, heads=12),
        text_encoder_2=_openclip_projected(
            vocab=49408, hidden=1280, intermediate=5120, layers=32, heads=20, projection=1280
        ),
        scheduler=_SDXL_SCHEDULER,
        tokenizer={"vocab_size": 49408, "model_max_length": 77},
        tokenizer_2={"vocab_size": 49408, "model_max_length": 77, "pad_token": "!"},
        seed=0,
        repo_id="sdbench/sdxl",
        family="sdxl",
    ),
}


#: Inpainting variants: the base spec with a 9-channel UNet input (4 noisy latents + 4 masked
#: image latents + 1 mask, the layout of ``runwayml/stable-diffusion-inpainting``); every other
#: setting equals the base, so LoRA and embedding files of the base apply unchanged.
INPAINT_VARIANTS: dict[str, str] = {"tiny-inpaint": "tiny", "sd15-inpaint": "sd15"}
INPAINT_IN_CHANNELS = 9


def _inpaint_variant(name: str, base: ModelSpec) -> ModelSpec:
    return dataclasses.replace(
        base,
        name=name,
        description=(
            f"{base.name} with the 9-channel inpainting UNet "
            "(latents + mask + masked-image latents)"
        ),
        unet={**base.unet, "in_channels": INPAINT_IN_CHANNELS},
        repo_id=f"sdbench/{name}",
    )


SPECS.update(
    {name: _inpaint_variant(name, SPECS[base]) for name, base in INPAINT_VARIANTS.items()}
)


def _fp16_twin(base: ModelSpec) -> ModelSpec:
    name = base.name + FP16_SUFFIX
    return dataclasses.replace(
        base,
        name=name,
        description=f"{base.name} with its weights stored in fp16",
        repo_id=f"sdbench/{name}",
        weights_dtype="float16",
    )


#: fp16 twins (``tiny-fp16``, ``sd15-fp16``, …): the same weights, rounded to fp16 as they are
#: drawn, so a model synthesised for an fp16 run is half the size and never exists in fp32.
SPECS.update({spec.name + FP16_SUFFIX: _fp16_twin(spec) for spec in list(SPECS.values())})


def base_spec(spec: ModelSpec) -> ModelSpec:
    """The zoo spec whose LoRA / embedding files ``spec`` shares.

    An inpainting variant shares the files of its base (same module names and widths); a spec
    whose architecture equals a zoo spec up to the UNet input channels shares that spec's
    files; any other spec is its own base.
    """
    if spec.name in INPAINT_VARIANTS and SPECS.get(spec.name) == spec:
        return SPECS[INPAINT_VARIANTS[spec.name]]

    def shape(candidate: ModelSpec) -> tuple[Any, ...]:
        unet = {k: v for k, v in candidate.unet.items() if k != "in_channels"}
        return (unet, candidate.vae, candidate.text_encoder, candidate.seed)

    for candidate in SPECS.values():
        if candidate.name not in INPAINT_VARIANTS and shape(candidate) == shape(spec):
            return candidate
    return spec


def get_spec(name: str) -> ModelSpec:
    """The zoo spec called ``name``; ``KeyError`` lists the known names."""
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; the zoo has {', '.join(SPECS)}") from None
