"""Multi-stage zoo models: Kandinsky 2.2 and DeepFloyd IF (diffusers only).

A :class:`ModelSpec <models.specs.ModelSpec>` is an SD-shaped model (one UNet, one VAE, CLIP
text encoders, one original single-file layout). These families are chains of diffusers
pipelines instead, each stage its own hub repository:

- **Kandinsky 2.2** (``kandinsky22``): the *prior* (``KandinskyV22PriorPipeline``: a
  ``PriorTransformer`` that turns the CLIP text embedding of the prompt into a CLIP image
  embedding, with its CLIP text and image encoders) and the *decoder*
  (``KandinskyV22Pipeline``: a UNet conditioned on that image embedding, denoising MoVQ
  latents, and the MoVQ VQ-GAN that decodes them);
- **DeepFloyd IF** (``deepfloyd-if``): *stage I* (``IFPipeline``: a pixel-space UNet at 64²
  conditioned on T5-v1.1-XXL's token states), *stage II* (``IFSuperResolutionPipeline``: a
  pixel UNet from 64² to 256², conditioned on the same T5 states and on the noised 64² image)
  and, as an option, *stage III* (``StableDiffusionUpscalePipeline``: the x4 latent upscaler,
  256² → 1024², with its own OpenCLIP text encoder).

So a :class:`StagedSpec` is a tuple of :class:`Stage` s, each with its weighted components (a
diffusers or transformers class and its config), its schedulers and its tokenizer. Neither
family has an original (CompVis/LDM) single-file layout: their releases are diffusers folders
only, so the zoo writes the hub layout (one pipeline folder per stage, plus ``stages.json``) and
the Hugging Face cache install (one repository per stage, as the releases are published).
Weights come from :mod:`models.synth`'s seeded draws, streamed to disk a tensor at a time in
the spec's dtype (T5-v1.1-XXL's encoder alone is 4.8B parameters).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .specs import FP16_SUFFIX, WEIGHTS_DTYPES, ZOO_FORMAT_VERSION
from .specs import _openclip_projected as openclip_projected
from .specs import _openclip_text as openclip_text
from .specs import _unet as sd_unet
from .specs import _vae as sd_vae

#: The multi-stage families: what each is and that the original backend never ran it.
STAGED_FAMILIES: dict[str, str] = {
    "kandinsky22": (
        "Kandinsky 2.2: a CLIP-embedding prior, then a UNet on MoVQ latents conditioned on "
        "the image embedding (diffusers folders only; no original single-file layout)"
    ),
    "deepfloyd-if": (
        "DeepFloyd IF: T5-v1.1-XXL, a 64² pixel UNet, a 256² super-resolution UNet, "
        "optionally the x4 upscaler (diffusers folders only; no original single-file layout)"
    ),
}
#: The stage that may be left out of a chain (the ``x4_upscaler`` axis adds it).
OPTIONAL_STAGE = "stage_3"
#: File at the root of a zoo hub folder of a staged model: its family and stage folders.
STAGES_FILE = "stages.json"


@dataclass(frozen=True)
class Component:
    """A weighted component: ``library`` (``diffusers`` | ``transformers``), its class and
    its config (a diffusers ``config.json``, or a transformers config with ``model_type``)."""

    library: str
    cls: str
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"library": self.library, "cls": self.cls, "config": self.config}


@dataclass(frozen=True)
class Stage:
    """One pipeline of a chain, in its release's repository layout."""

    #: ``prior`` / ``decoder``; ``stage_1`` / ``stage_2`` / ``stage_3``.
    name: str
    #: The diffusers pipeline class (``model_index.json``'s ``_class_name``).
    pipeline: str
    #: Weighted components by their ``model_index.json`` name, in drawing order.
    components: dict[str, Component]
    #: Scheduler configs (with ``_class_name``) by component name (``scheduler``, IF's
    #: ``image_noising_scheduler``, the upscaler's ``low_res_scheduler``).
    schedulers: dict[str, dict[str, Any]]
    #: The tokenizer's settings (``kind``: ``clip`` | ``t5``), or None (a stage that takes
    #: the previous stage's text states).
    tokenizer: dict[str, Any] | None = None
    #: Other ``model_index.json`` entries: components the zoo leaves out (``[None, None]``),
    #: the image processor, pipeline flags.
    index_extra: dict[str, Any] = field(default_factory=dict)
    #: The image processor's ``preprocessor_config`` (Kandinsky's prior), if any.
    image_processor: dict[str, Any] | None = None
    #: How the stage's repository is named after the model's (``-prior``, ``-decoder``).
    repo_suffix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pipeline": self.pipeline,
            "components": {k: v.to_dict() for k, v in self.components.items()},
            "schedulers": self.schedulers,
            "tokenizer": self.tokenizer,
            "index_extra": self.index_extra,
            "image_processor": self.image_processor,
            "repo_suffix": self.repo_suffix,
        }


@dataclass(frozen=True)
class StagedSpec:
    """A multi-stage zoo model: its stages, seed and storage dtype."""

    name: str
    description: str
    family: str
    stages: tuple[Stage, ...]
    seed: int = 0
    #: The repository of the stage a ``hub:`` reference names (the decoder / stage I);
    #: the other stages' repositories are this with their :attr:`Stage.repo_suffix`.
    repo_id: str = ""
    weights_dtype: str = "float32"
    #: Default sizes and steps of the family's releases (for messages and scenarios).
    defaults: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in STAGED_FAMILIES:
            raise ValueError(f"family must be one of {', '.join(STAGED_FAMILIES)}")
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}")

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"{self.name} has no stage {name!r}; its stages: "
                       f"{', '.join(self.stage_names)}")

    @property
    def main_stage(self) -> Stage:
        """The stage whose repository a ``hub:`` reference names: Kandinsky's decoder (as
        diffusers' combined pipeline does), IF's stage I."""
        return self.stages[1] if self.family == "kandinsky22" else self.stages[0]

    def stage_repo(self, stage: Stage) -> str:
        """The hub repository of ``stage``."""
        main = self.main_stage
        base = self.repo_id.removesuffix(main.repo_suffix)
        return base + stage.repo_suffix

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "description": self.description,
            "family": self.family,
            "stages": [stage.to_dict() for stage in self.stages],
            "seed": self.seed,
            "repo_id": self.repo_id,
            "zoo_format_version": ZOO_FORMAT_VERSION,
        }
        if self.weights_dtype != "float32":
            data["weights_dtype"] = self.weights_dtype
        return data

    def fingerprint(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- configs


def _clip_vision(hidden: int, intermediate: int, layers: int, heads: int, projection: int,
                 image_size: int = 224, patch_size: int = 14) -> dict[str, Any]:
    """A ``CLIPVisionModelWithProjection`` config (Kandinsky's prior image encoder)."""
    return {
        "model_type": "clip_vision_model",
        "architectures": ["CLIPVisionModelWithProjection"],
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_channels": 3,
        "image_size": image_size,
        "patch_size": patch_size,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": projection,
    }


def _t5_encoder(vocab: int, d_model: int, d_ff: int, layers: int, heads: int,
                d_kv: int = 64) -> dict[str, Any]:
    """A ``T5EncoderModel`` config of the T5 v1.1 kind (gated GELU, untied head)."""
    return {
        "model_type": "t5",
        "architectures": ["T5EncoderModel"],
        "vocab_size": vocab,
        "d_model": d_model,
        "d_ff": d_ff,
        "d_kv": d_kv,
        "num_layers": layers,
        "num_heads": heads,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.1,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": True,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def _prior(heads: int, head_dim: int, layers: int, embedding_dim: int) -> dict[str, Any]:
    """Kandinsky 2.2's ``PriorTransformer`` (77 text tokens + 4 extra embeddings)."""
    return {
        "_class_name": "PriorTransformer",
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "num_layers": layers,
        "embedding_dim": embedding_dim,
        "num_embeddings": 77,
        "additional_embeddings": 4,
        "dropout": 0.0,
    }


def _kandinsky_unet(widths: tuple[int, ...], layers: int, head_dim: int, context: int,
                    image_embed: int, sample_size: int) -> dict[str, Any]:
    """Kandinsky 2.2's decoder UNet: conditioned on the image embedding (projected to
    ``context``-wide tokens and added to the time embedding), predicting eps and variance."""
    levels = len(widths)
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 8,
        "down_block_types": ["ResnetDownsampleBlock2D"]
        + ["SimpleCrossAttnDownBlock2D"] * (levels - 1),
        "up_block_types": ["SimpleCrossAttnUpBlock2D"] * (levels - 1)
        + ["ResnetUpsampleBlock2D"],
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "block_out_channels": list(widths),
        "layers_per_block": layers,
        "attention_head_dim": head_dim,
        "cross_attention_dim": context,
        "encoder_hid_dim": image_embed,
        "encoder_hid_dim_type": "image_proj",
        "addition_embed_type": "image",
        "addition_embed_type_num_heads": 64,
        "class_embed_type": None,
        "resnet_time_scale_shift": "scale_shift",
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "only_cross_attention": False,
        "upcast_attention": False,
        "use_linear_projection": False,
    }


def _movq(widths: tuple[int, ...], layers: int, codebook: int) -> dict[str, Any]:
    """The MoVQ VQ-GAN: spatially conditioned normalisation, attention at the deepest level."""
    levels = len(widths)
    return {
        "_class_name": "VQModel",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * (levels - 1) + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (levels - 1),
        "block_out_channels": list(widths),
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": 4,
        "vq_embed_dim": 4,
        "num_vq_embeddings": codebook,
        "norm_num_groups": 32,
        "norm_type": "spatial",
        "scaling_factor": 0.18215,
        "sample_size": 32,
    }


def _if_unet(widths: tuple[int, ...], layers: int | list[int], head_dim: int, context: int,
             text: int, sample_size: int, *, super_resolution: bool = False,
             attention: tuple[bool, ...] | None = None, time_dim: int | None = None,
             heads_added: int = 64) -> dict[str, Any]:
    """DeepFloyd IF's pixel UNets: T5 states projected to ``context`` (``encoder_hid_dim``)
    and pooled into the time embedding (``addition_embed_type: text``); eps and variance out.
    Stage II also takes the noised low-resolution image (6 channels in) and its noise level
    as a class embedding."""
    levels = len(widths)
    attention = attention or (False,) + (True,) * (levels - 1)
    config: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": 6 if super_resolution else 3,
        "out_channels": 6,
        "down_block_types": ["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D"
                             for a in attention],
        "up_block_types": ["SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D"
                           for a in reversed(attention)],
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "block_out_channels": list(widths),
        "layers_per_block": layers,
        "attention_head_dim": head_dim,
        "cross_attention_dim": context,
        "encoder_hid_dim": text,
        "encoder_hid_dim_type": "text_proj",
        "addition_embed_type": "text",
        "addition_embed_type_num_heads": heads_added,
        "cross_attention_norm": "group_norm",
        "resnet_time_scale_shift": "scale_shift",
        "act_fn": "gelu",
        "norm_num_groups": 32,
        "only_cross_attention": False,
        "upcast_attention": False,
        "use_linear_projection": False,
    }
    if super_resolution:  # IF-II's: cross-attention only, the residual scales of convert_if
        config |= {
            "class_embed_type": "timestep",
            "only_cross_attention": True,
            "mid_block_scale_factor": 1.4142271813407583,
            "resnet_out_scale_factor": 1.4142271813407583,
            "resnet_skip_time_act": True,
            "time_embedding_act_fn": "gelu",
        }
    if time_dim is not None:
        config["time_embedding_dim"] = time_dim
    return config


def _x4_unet(widths: tuple[int, ...], layers: int, heads: int, context: int,
             attention: tuple[bool, ...]) -> dict[str, Any]:
    """The x4 upscaler's latent UNet: SD's structure with 4 noisy latents + the 3-channel
    low-resolution image in, its noise level as a class embedding (``num_class_embeds``
    1000), cross-attention only in the attention levels."""
    return {
        **sd_unet(widths, attention, layers=layers, heads=heads, context=context,
                  sample_size=128, in_channels=7, linear=True),
        "num_class_embeds": 1000,
        "only_cross_attention": [True] * sum(attention)
        + [False] * (len(attention) - sum(attention)),
        "upcast_attention": False,
    }


def _x4_vae(widths: tuple[int, ...], layers: int) -> dict[str, Any]:
    """The x4 upscaler's f4 KL VAE (3 levels): SD's VAE structure, scaling factor 0.08333."""
    return {**sd_vae(widths, layers, sample_size=256), "scaling_factor": 0.08333}


#: Kandinsky 2.2's prior scheduler (predicts the clean embedding; "fixed_small_log").
_UNCLIP_SCHEDULER: dict[str, Any] = {
    "_class_name": "UnCLIPScheduler",
    "num_train_timesteps": 1000,
    "variance_type": "fixed_small_log",
    "clip_sample": True,
    "clip_sample_range": 10.0,
    "prediction_type": "sample",
}
#: Kandinsky 2.2's decoder scheduler.
_KANDINSKY_DDPM: dict[str, Any] = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "thresholding": False,
    "variance_type": "fixed_small",
    "timestep_spacing": "leading",
}
#: DeepFloyd IF's stage I / II scheduler: cosine betas, learned variance, dynamic thresholding.
_IF_DDPM: dict[str, Any] = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "thresholding": True,
    "dynamic_thresholding_ratio": 0.95,
    "sample_max_value": 1.5,
    "prediction_type": "epsilon",
    "variance_type": "learned_range",
    "timestep_spacing": "leading",
}
#: Stage II's (its thresholding clips at 1, stage I's at 1.5).
_IF_DDPM_II: dict[str, Any] = {**_IF_DDPM, "sample_max_value": 1.0}
#: Stage II's image-noising scheduler (noises the 64² image to ``noise_level``).
_IF_NOISING: dict[str, Any] = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
}
#: The x4 upscaler's schedulers.
_X4_DDIM: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
}
_X4_LOW_RES: dict[str, Any] = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "clip_sample": False,
    "variance_type": "fixed_small",
}
#: CLIP's image preprocessing (Kandinsky's prior image encoder).
_CLIP_IMAGE_PROCESSOR: dict[str, Any] = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}


def _kandinsky(name: str, description: str, *, text: dict[str, Any], image: dict[str, Any],
               prior: dict[str, Any], unet: dict[str, Any], movq: dict[str, Any],
               vocab: int, repo: str, defaults: dict[str, Any]) -> StagedSpec:
    return StagedSpec(
        name=name,
        description=description,
        family="kandinsky22",
        stages=(
            Stage(
                name="prior",
                pipeline="KandinskyV22PriorPipeline",
                components={
                    "prior": Component("diffusers", "PriorTransformer", prior),
                    "text_encoder": Component("transformers", "CLIPTextModelWithProjection",
                                              text),
                    "image_encoder": Component("transformers", "CLIPVisionModelWithProjection",
                                               image),
                },
                schedulers={"scheduler": _UNCLIP_SCHEDULER},
                tokenizer={"kind": "clip", "vocab_size": vocab, "model_max_length": 77,
                           "pad_token": "!"},
                index_extra={"image_processor": ["transformers", "CLIPImageProcessor"]},
                image_processor=_CLIP_IMAGE_PROCESSOR,
                repo_suffix="-prior",
            ),
            Stage(
                name="decoder",
                pipeline="KandinskyV22Pipeline",
                components={
                    "unet": Component("diffusers", "UNet2DConditionModel", unet),
                    "movq": Component("diffusers", "VQModel", movq),
                },
                schedulers={"scheduler": _KANDINSKY_DDPM},
                repo_suffix="-decoder",
            ),
        ),
        repo_id=f"{repo}-decoder",
        defaults=defaults,
    )


#: IF leaves out what the zoo does not synthesise (as the SD zoo has no safety checker).
_IF_INDEX = {
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "watermarker": [None, None],
    "requires_safety_checker": False,
}


def _deepfloyd(name: str, description: str, *, t5: dict[str, Any], stage_1: dict[str, Any],
               stage_2: dict[str, Any], x4_unet: dict[str, Any], x4_vae: dict[str, Any],
               x4_text: dict[str, Any], vocab: int, clip_vocab: int, repo: str,
               defaults: dict[str, Any]) -> StagedSpec:
    # the hub's tokenizer says 512; IF's pipelines tokenize to 77 whatever it says
    t5_tokenizer = {"kind": "t5", "vocab_size": vocab, "model_max_length": 512}
    return StagedSpec(
        name=name,
        description=description,
        family="deepfloyd-if",
        stages=(
            Stage(
                name="stage_1",
                pipeline="IFPipeline",
                components={
                    "unet": Component("diffusers", "UNet2DConditionModel", stage_1),
                    "text_encoder": Component("transformers", "T5EncoderModel", t5),
                },
                schedulers={"scheduler": _IF_DDPM},
                tokenizer=t5_tokenizer,
                index_extra=_IF_INDEX,
                repo_suffix="-IF-I",
            ),
            Stage(
                name="stage_2",
                pipeline="IFSuperResolutionPipeline",
                components={"unet": Component("diffusers", "UNet2DConditionModel", stage_2)},
                schedulers={"scheduler": _IF_DDPM_II, "image_noising_scheduler": _IF_NOISING},
                # stage II runs on stage I's T5 states: no text encoder of its own
                tokenizer=t5_tokenizer,
                index_extra={**_IF_INDEX, "text_encoder": [None, None]},
                repo_suffix="-IF-II",
            ),
            Stage(
                name=OPTIONAL_STAGE,
                pipeline="StableDiffusionUpscalePipeline",
                components={
                    "unet": Component("diffusers", "UNet2DConditionModel", x4_unet),
                    "vae": Component("diffusers", "AutoencoderKL", x4_vae),
                    "text_encoder": Component("transformers", "CLIPTextModel", x4_text),
                },
                schedulers={"scheduler": _X4_DDIM, "low_res_scheduler": _X4_LOW_RES},
                tokenizer={"kind": "clip", "vocab_size": clip_vocab, "model_max_length": 77,
                           "pad_token": "!"},
                index_extra={"max_noise_level": 350, "safety_checker": [None, None],
                             "feature_extractor": [None, None], "watermarker": [None, None]},
                repo_suffix="-x4-upscaler",
            ),
        ),
        repo_id=f"{repo}-IF-I",
        defaults=defaults,
    )


KANDINSKY_DEFAULTS = {"resolution": 768, "steps": {"prior": 25, "decoder": 50},
                      "guidance": 4.0}
DEEPFLOYD_DEFAULTS = {"resolution": 256, "steps": {"stage_1": 100, "stage_2": 50,
                                                    "stage_3": 75},
                      "guidance": {"stage_1": 7.0, "stage_2": 4.0, "stage_3": 9.0}}

STAGED_SPECS: dict[str, StagedSpec] = {
    "tiny-kandinsky22": _kandinsky(
        "tiny-kandinsky22",
        "Kandinsky 2.2 structure at test widths (prior 2x32, CLIP text 2x32 / vision 2x32, "
        "decoder UNet 32/64, MoVQ f8)",
        text=openclip_projected(1000, 32, 64, 2, 4, 32),
        image=_clip_vision(32, 64, 2, 4, 32, image_size=32, patch_size=8),
        prior=_prior(heads=2, head_dim=16, layers=2, embedding_dim=32),
        unet=_kandinsky_unet((32, 64), layers=1, head_dim=8, context=32, image_embed=32,
                             sample_size=8),
        movq=_movq((32, 32, 64, 64), layers=1, codebook=64),
        vocab=1000,
        repo="sdbench/tiny-kandinsky22",
        defaults={**KANDINSKY_DEFAULTS, "resolution": 64},
    ),
    "tiny-deepfloyd-if": _deepfloyd(
        "tiny-deepfloyd-if",
        "DeepFloyd IF structure at test widths (T5 2x32, stage I UNet 32/64 at 16², "
        "stage II 32/64, x4 upscaler 32/64)",
        t5=_t5_encoder(1000, 32, 64, 2, 4, d_kv=8),
        stage_1=_if_unet((32, 64), layers=1, head_dim=8, context=64, text=32, sample_size=16,
                         heads_added=2),
        stage_2=_if_unet((32, 64), layers=[1, 1], head_dim=8, context=64, text=32,
                         sample_size=64, super_resolution=True, time_dim=64, heads_added=2),
        x4_unet=_x4_unet((32, 64), layers=1, heads=8, context=32, attention=(False, True)),
        x4_vae=_x4_vae((32, 32, 64), layers=1),
        x4_text=openclip_text(1000, 32, 64, 2, 4),
        vocab=1000,
        clip_vocab=1000,
        repo="sdbench/tiny-deepfloyd",
        defaults={**DEEPFLOYD_DEFAULTS, "resolution": 64},
    ),
    # The releases' shapes (configs rebuilt from diffusers' conversion scripts and tests and
    # the model cards; parameters counted on the meta device, docs/zoo.md).
    "kandinsky22": _kandinsky(
        "kandinsky22",
        "Kandinsky 2.2 shapes: 1.0B prior, CLIP ViT-bigG/14 text (0.7B) and vision (1.8B) "
        "encoders, 1.25B decoder UNet on MoVQ latents (67M, f8)",
        text=openclip_projected(49408, 1280, 5120, 32, 20, 1280),
        image=_clip_vision(1664, 8192, 48, 16, 1280),
        prior=_prior(heads=32, head_dim=64, layers=20, embedding_dim=1280),
        unet=_kandinsky_unet((384, 768, 1152, 1536), layers=3, head_dim=64, context=768,
                             image_embed=1280, sample_size=64),
        movq=_movq((128, 256, 256, 512), layers=2, codebook=16384),
        vocab=49408,
        repo="sdbench/kandinsky22",
        defaults=KANDINSKY_DEFAULTS,
    ),
    "deepfloyd-if": _deepfloyd(
        "deepfloyd-if",
        "DeepFloyd IF shapes: T5-v1.1-XXL encoder (4.76B), IF-I-XL 4.3B pixel UNet at 64², "
        "IF-II-L 1.2B super-resolution UNet to 256², the x4 upscaler (0.47B UNet) to 1024²",
        t5=_t5_encoder(32128, 4096, 10240, 24, 64),
        stage_1=_if_unet((704, 1408, 2112, 2816), layers=3, head_dim=64, context=2816,
                         text=4096, sample_size=64),
        stage_2=_if_unet((128, 256, 512, 1024, 1280), layers=[2, 2, 3, 5, 5], head_dim=64,
                         context=1280, text=4096, sample_size=256, super_resolution=True,
                         attention=(False, False, False, True, True), time_dim=1280),
        x4_unet=_x4_unet((256, 512, 512, 1024), layers=2, heads=8, context=1024,
                         attention=(False, True, True, True)),
        x4_vae=_x4_vae((128, 256, 512), layers=2),
        x4_text=openclip_text(49408, 1024, 4096, 23, 16),
        vocab=32128,
        clip_vocab=49408,
        repo="sdbench/deepfloyd",
        defaults=DEEPFLOYD_DEFAULTS,
    ),
}


def _fp16_twin(base: StagedSpec) -> StagedSpec:
    suffix = base.main_stage.repo_suffix
    return dataclasses.replace(
        base,
        name=base.name + FP16_SUFFIX,
        description=f"{base.name} with its weights stored in fp16",
        repo_id=base.repo_id.removesuffix(suffix) + FP16_SUFFIX + suffix,
        weights_dtype="float16",
    )


STAGED_SPECS.update({s.name + FP16_SUFFIX: _fp16_twin(s) for s in list(STAGED_SPECS.values())})


def stages_index(spec: StagedSpec) -> dict[str, Any]:
    """``stages.json`` of a zoo hub folder: the family and each stage's folder."""
    return {"family": spec.family, "name": spec.name,
            "stages": {stage.name: stage.name for stage in spec.stages}}


def read_stages(folder: Path) -> dict[str, Any] | None:
    """``stages.json`` of ``folder`` (a staged zoo hub folder), or None."""
    path = folder / STAGES_FILE
    if not path.is_file():
        return None
    return dict(json.loads(path.read_text()))


# --------------------------------------------------------------------------- synthesis


def empty_stage_components(stage: Stage) -> dict[str, Any]:
    """The weighted components of ``stage``, parameters on the meta device (buffers real)."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    modules: dict[str, Any] = {}
    with init_empty_weights():
        for name, component in stage.components.items():
            if component.library == "diffusers":
                modules[name] = getattr(diffusers, component.cls).from_config(component.config)
            else:
                settings = {k: v for k, v in component.config.items()
                            if k not in ("model_type", "architectures")}
                config = transformers.AutoConfig.for_model(component.config["model_type"],
                                                           **settings)
                modules[name] = getattr(transformers, component.cls)(config)
    for module in modules.values():
        if hasattr(module, "tie_weights"):  # T5's shared / encoder embeddings: one tensor
            module.tie_weights()
    return modules


def parameter_counts(spec: StagedSpec) -> dict[str, int]:
    """``stage.component`` → number of parameters."""
    return {
        f"{stage.name}.{name}": sum(p.numel() for p in module.parameters())
        for stage in spec.stages
        for name, module in empty_stage_components(stage).items()
    }


def stage_index(stage: Stage) -> dict[str, Any]:
    """The stage's ``model_index.json``."""
    import diffusers

    index: dict[str, Any] = {"_class_name": stage.pipeline,
                             "_diffusers_version": diffusers.__version__}
    for name, component in stage.components.items():
        index[name] = [component.library, component.cls]
    for name, config in stage.schedulers.items():
        index[name] = ["diffusers", config["_class_name"]]
    if stage.tokenizer is not None:
        kind = "T5Tokenizer" if stage.tokenizer["kind"] == "t5" else "CLIPTokenizer"
        index["tokenizer"] = ["transformers", kind]
    index.update(stage.index_extra)
    return dict(sorted(index.items()))


def write_stage_folder(spec: StagedSpec, stage: Stage, folder: Path,
                       weights: bool = True) -> Path:
    """One stage's pipeline folder (the release repository's layout): ``model_index.json``,
    schedulers, tokenizer, image processor, each component's config and — with ``weights``
    — its safetensors file streamed a tensor at a time in the spec's dtype."""
    import diffusers
    import torch

    from .convert import stream_safetensors
    from .synth import synthetic_plan
    from .tokenizer import write_t5_tokenizer, write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(stage_index(stage), indent=2) + "\n")
    for name, config in stage.schedulers.items():
        scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
        scheduler.save_pretrained(folder / name)
    if stage.tokenizer is not None:
        if stage.tokenizer["kind"] == "t5":
            write_t5_tokenizer(stage.tokenizer, folder / "tokenizer")
        else:
            write_tokenizer(None, folder / "tokenizer", stage.tokenizer)
    if stage.image_processor is not None:
        target = folder / "image_processor"
        target.mkdir(parents=True, exist_ok=True)
        config = {"image_processor_type": "CLIPImageProcessor", **stage.image_processor}
        (target / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")
    dtype = getattr(torch, spec.weights_dtype)
    for name, module in empty_stage_components(stage).items():
        target = folder / name
        component = stage.components[name]
        if component.library == "diffusers":
            module.save_config(target)
            weights_file = target / "diffusion_pytorch_model.safetensors"
        else:
            module.config.dtype = dtype  # as transformers' save_pretrained records it
            module.config.save_pretrained(target)
            weights_file = target / "model.safetensors"
        if weights:
            plan = synthetic_plan(module, spec.seed, f"{stage.name}.{name}", dtype)
            stream_safetensors(weights_file, plan, {"format": "pt"})
    return folder


def write_staged_hub(spec: StagedSpec, folder: Path) -> Path:
    """The zoo's hub layout of ``spec``: one pipeline folder per stage and ``stages.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    for stage in spec.stages:
        write_stage_folder(spec, stage, folder / stage.name)
    (folder / STAGES_FILE).write_text(json.dumps(stages_index(spec), indent=2) + "\n")
    return folder
