"""The diffusers backend: ``StableDiffusionPipeline`` driven through the harness's vocabulary.

Loading: a hub-layout folder (``from_pretrained``), a single ``.safetensors`` / ``.ckpt`` file
(``from_single_file`` offline, with the zoo's config folder of the same architecture) or a
hub id (resolved to a snapshot folder by :mod:`models.sources`).

Memory modes: ``medvram`` = ``enable_model_cpu_offload`` (whole components move to the GPU
when used), ``lowvram`` = ``enable_sequential_cpu_offload`` (sub-modules move on demand). Both
need an accelerator; on a CPU-only machine such cells are ``unsupported``.

Samplers map to schedulers (k-diffusion style ones with ``timestep_spacing="linspace"``, the
spacing of k-diffusion's ``get_sigmas``; ``*_karras`` with ``use_karras_sigmas=True``):

==============  ====================================================================
sampler         diffusers scheduler
==============  ====================================================================
euler           EulerDiscreteScheduler
euler_a         EulerAncestralDiscreteScheduler
heun            HeunDiscreteScheduler
dpm_2           KDPM2DiscreteScheduler
dpm_2_a         KDPM2AncestralDiscreteScheduler
lms             LMSDiscreteScheduler
dpmpp_2m        DPMSolverMultistepScheduler (dpmsolver++, order 2)
dpmpp_2s_a      — (no ancestral single-step DPM++ in diffusers: unsupported)
dpmpp_sde       DPMSolverSDEScheduler (needs torchsde)
ddim            DDIMScheduler
deis            DEISMultistepScheduler
unipc           UniPCMultistepScheduler
==============  ====================================================================

Phases: the prompt is encoded with ``pipe.encode_prompt`` (timed as ``encode``); the pipeline
then runs from the embeddings; the last step's callback splits ``denoise`` from ``decode``
(VAE decode and post-processing to an array), so every phase runs exactly as the pipeline
runs it, offload hooks included.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from backends.base import TORCH_DTYPES, Backend, Output, Request, Session
from harness.errors import UnsupportedError, UserError
from harness.vocabulary import split_sampler

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from harness.matrix import Cell
    from harness.measure import GenerationTimer
    from models.sources import ResolvedModel

#: sampler base name -> (scheduler class name, extra config, k-diffusion style spacing)
SCHEDULERS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "euler": ("EulerDiscreteScheduler", {}, True),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, True),
    "heun": ("HeunDiscreteScheduler", {}, True),
    "dpm_2": ("KDPM2DiscreteScheduler", {}, True),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}, True),
    "lms": ("LMSDiscreteScheduler", {}, True),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        False,
    ),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}, True),
    "ddim": ("DDIMScheduler", {}, False),
    "deis": ("DEISMultistepScheduler", {}, False),
    "unipc": ("UniPCMultistepScheduler", {}, False),
}
_NO_KARRAS = {"EulerAncestralDiscreteScheduler", "DDIMScheduler"}


def sampler_problem(sampler: str) -> str | None:
    """Why the diffusers backend cannot run ``sampler``, or None."""
    base, karras = split_sampler(sampler)
    if base not in SCHEDULERS:
        return f"sampler {sampler}: diffusers has no equivalent scheduler"
    class_name = SCHEDULERS[base][0]
    if karras and class_name in _NO_KARRAS:
        return f"sampler {sampler}: {class_name} has no Karras sigma option"
    if base == "dpmpp_sde" and importlib.util.find_spec("torchsde") is None:
        return "sampler dpmpp_sde: DPMSolverSDEScheduler needs torchsde, not installed"
    return None


def make_scheduler(sampler: str, base_config: dict[str, Any]) -> Any:
    """A fresh scheduler for ``sampler`` built from the model's scheduler config."""
    import diffusers

    problem = sampler_problem(sampler)
    if problem is not None:
        raise UnsupportedError(problem)
    base, karras = split_sampler(sampler)
    class_name, extra, linspace = SCHEDULERS[base]
    config = dict(base_config) | extra
    if linspace:
        config["timestep_spacing"] = "linspace"
    if karras:
        config["use_karras_sigmas"] = True
    return getattr(diffusers, class_name).from_config(config)


def _component_report(path: str) -> str:
    """Which original-layout components a single file lacks (for the meta-tensor error)."""
    from safetensors import safe_open

    prefixes = {
        "UNet": "model.diffusion_model.",
        "VAE": "first_stage_model.",
        "text encoder": "cond_stage_model.transformer.",
    }
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as handle:
                keys = list(handle.keys())
        else:
            data = torch.load(path, map_location="meta", weights_only=True)
            keys = list(data.get("state_dict", data))
    except Exception as error:  # noqa: BLE001 - only used to enrich an error message
        return f"(could not list its keys: {error})"
    missing = [name for name, prefix in prefixes.items() if not any(k.startswith(prefix) for k in keys)]
    if missing:
        return f"no {', '.join(missing)} weights (keys starting with " + ", ".join(
            repr(prefixes[name]) for name in missing) + ")"
    return "some weights of the configured architecture are missing (an architecture mismatch)"


class DiffusersSession(Session):
    def __init__(self, pipe: StableDiffusionPipeline, device: torch.device, dtype: torch.dtype):
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.base_scheduler_config = dict(pipe.scheduler.config)
        self.latent_channels = int(pipe.vae.config.latent_channels)
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self._sampler: str | None = None

    def _use_sampler(self, sampler: str) -> None:
        if sampler != self._sampler:
            self.pipe.scheduler = make_scheduler(sampler, self.base_scheduler_config)
            self._sampler = sampler

    def generate(self, request: Request, timer: GenerationTimer) -> Output:
        pipe = self.pipe
        self._use_sampler(request.sampler)
        device = pipe._execution_device
        cfg = request.guidance > 1.0
        generator = torch.Generator(device="cpu").manual_seed(request.seed)

        with timer.phase("encode"):
            prompt_embeds, negative_embeds = pipe.encode_prompt(
                request.prompt,
                device,
                num_images_per_prompt=request.batch,
                do_classifier_free_guidance=cfg,
                negative_prompt=request.negative_prompt or None,
            )

        final: dict[str, torch.Tensor] = {}

        def on_step_end(
            pipeline: Any, index: int, _timestep: Any, kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            timer.step()
            if index == len(pipeline.scheduler.timesteps) - 1:
                final["latents"] = kwargs["latents"].detach().clone()
                timer.end("denoise")
                timer.begin("decode")
            return kwargs

        sigmas = request.extra.get("sigmas")
        timer.begin("denoise")
        result = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds if cfg else None,
            height=request.height,
            width=request.width,
            num_inference_steps=None if sigmas is not None else request.steps,
            sigmas=None if sigmas is None else list(map(float, sigmas)),
            guidance_scale=request.guidance,
            latents=request.noise.to(device=device, dtype=prompt_embeds.dtype),
            generator=generator,
            output_type="np",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        timer.end("decode")
        images = np.asarray(result.images, dtype=np.float32)
        return Output(images=images, latents=final["latents"].float())

    def close(self) -> None:
        if hasattr(self.pipe, "remove_all_hooks"):
            self.pipe.remove_all_hooks()
        del self.pipe


class DiffusersBackend(Backend):
    name = "diffusers"

    def unsupported(self, cell: Cell, device: torch.device) -> str | None:
        if cell.workflow != "txt2img":
            return f"workflow {cell.workflow}: not implemented by the diffusers backend yet"
        if cell.offload != "none" and device.type != "cuda":
            mode = {"medvram": "model CPU offload", "lowvram": "sequential CPU offload"}
            return (
                f"offload {cell.offload} ({mode[cell.offload]}) needs a CUDA device; "
                f"device is {device.type}"
            )
        if cell.attention == "xformers" and importlib.util.find_spec("xformers") is None:
            return "attention xformers: the xformers package is not installed"
        return sampler_problem(cell.sampler)

    def load(self, cell: Cell, model: ResolvedModel, device: torch.device) -> Session:
        from diffusers import StableDiffusionPipeline

        dtype = TORCH_DTYPES[cell.dtype]
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        diffusers_logging.set_verbosity_error()  # load-time advice would interleave the progress
        common: dict[str, Any] = {
            "dtype": dtype,
            "local_files_only": True,
            "safety_checker": None,
            "requires_safety_checker": False,
        }
        if model.is_single_file:
            if model.config_dir is None:
                raise UserError(
                    f"model {model.reference!r}: no config folder for this single file; "
                    "the diffusers backend needs the architecture's configs"
                )
            try:
                pipe = StableDiffusionPipeline.from_single_file(
                    str(model.path), config=str(model.config_dir), **common
                )
            except (RuntimeError, ValueError, NotImplementedError) as error:
                if "meta tensor" not in str(error):
                    raise
                raise UserError(
                    f"model {model.reference!r}: {model.path.name} does not fit the "
                    f"configured architecture: {_component_report(str(model.path))}"
                ) from error
        else:
            pipe = StableDiffusionPipeline.from_pretrained(str(model.path), **common)
        pipe.set_progress_bar_config(disable=True)
        self._configure(pipe, cell, device)
        return DiffusersSession(pipe, device, dtype)

    @staticmethod
    def _configure(pipe: StableDiffusionPipeline, cell: Cell, device: torch.device) -> None:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        if cell.attention == "sdp":
            pipe.unet.set_attn_processor(AttnProcessor2_0())
            pipe.vae.set_attn_processor(AttnProcessor2_0())
        elif cell.attention == "math":
            pipe.unet.set_attn_processor(AttnProcessor())
            pipe.vae.set_attn_processor(AttnProcessor())
        else:
            pipe.enable_xformers_memory_efficient_attention()
        if cell.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if cell.offload == "medvram":
            pipe.enable_model_cpu_offload(device=device)
        elif cell.offload == "lowvram":
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.to(device)
        if cell.compile != "none":
            pipe.unet = torch.compile(  # type: ignore[assignment]
                pipe.unet, mode=cell.compile, fullgraph=cell.fullgraph
            )
