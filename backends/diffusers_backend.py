"""The diffusers backend: diffusers' Stable Diffusion pipelines driven through the harness's
vocabulary.

Loading: a hub-layout folder (``from_pretrained``), a single ``.safetensors`` / ``.ckpt`` file
(``from_single_file`` offline, with the zoo's config folder of the same architecture) or a
hub id (resolved to a snapshot folder by :mod:`models.sources`). A 9-channel inpainting UNet
(``unet.config.in_channels == 9``) loads through ``StableDiffusionPipeline`` too (both layouts:
the pipeline class does not check the UNet's input width); it then runs only ``inpaint``.

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
ddpm            DDPMScheduler (Kandinsky 2.2's and DeepFloyd IF's release scheduler)
==============  ====================================================================

Workflows. The workflow pipelines share every component with the loaded one
(``from_pipe``), are built once per session on first use, and get the session's scheduler
before each call:

=========  ==========================================================================
workflow   how it runs
=========  ==========================================================================
txt2img    ``StableDiffusionPipeline`` from ``latents=request.noise``.
img2img    ``StableDiffusionImg2ImgPipeline``. Init latents = VAE encode of
           ``init_image`` taking the latent distribution's **mode** (its mean), not a
           sample, times the scaling factor — deterministic, and what the original
           backend does. Timesteps by ``strength`` as diffusers' ``get_timesteps``
           (``int(steps * strength)`` steps at the end of the schedule); start =
           ``scheduler.add_noise(init, request.noise, t_start)``. No step left (strength
           0, or ``steps * strength < 1``) → no denoising: the output latents are the
           init latents and the VAE decodes them.
inpaint    ``StableDiffusionInpaintPipeline``. 4-channel UNet: diffusers' latent masking
           (after every step the unmasked latents are reset to the init latents noised to
           the next timestep with ``request.noise``, and to the init latents themselves
           after the last one, so the final latents equal the init latents wherever the
           mask, nearest-downsampled to the latent size, is 0). 9-channel UNet: the
           mask and the mode-encoded masked image (``image * (mask < 0.5)``) are
           concatenated to the UNet input. Strength 1 starts from
           ``request.noise * init_noise_sigma``, lower strengths as img2img.
hires      Pass 1 txt2img at (width, height) from ``request.noise``; upscale the latents
           by ``hires_scale`` to the output size (``latent``: bilinear interpolation of
           the latents, A1111's "Latent" upscaler; ``image``: decode, 8-bit RGB resize with
           PIL LANCZOS as A1111 does, encode with the mode); pass 2 img2img at
           ``strength`` from ``request.hires_noise`` with the same ``steps``.
=========  ==========================================================================

Where a diffusers pipeline draws its own start noise (img2img and inpaint
``prepare_latents``), the session replaces that method on the pipeline instance for the call
(:meth:`DiffusersSession._start_noise`) so that it uses the harness's noise; ancestral / SDE
noise stays the pipeline generator's, seeded from ``request.seed``.

Features:

- **LoRA**: kohya / A1111 ``.safetensors`` through ``load_lora_weights`` (peft), one adapter per
  file (loaded once per session, named after the file) and ``set_adapters(names,
  adapter_weights=strengths)`` per request; a request without LoRAs runs with the adapters
  disabled (``disable_lora``), which gives exactly the base model's output. diffusers/peft
  only *warn* about LoRA keys that name no module, so the session checks a kohya file's
  module names against the model before loading and counts the modules the adapter really
  wrapped after loading; any key left over is a :class:`~harness.errors.UserError` naming
  the file and a few keys.
- **Textual inversion**: ``load_textual_inversion(path, token=...)`` for files (A1111 ``.pt``
  and ``.safetensors``), ``load_textual_inversion(vectors, token=...)`` for vectors put in by
  hand; an ``n``-vector embedding adds ``token, token_1 … token_{n-1}`` and diffusers expands
  the trigger word in the prompt to all of them. Loaded once per session, keyed by (token,
  source); an embedding whose token is reused with another source, or whose token occurs in
  a prompt of a request that does not ask for it, is unloaded first.
- Prompts are truncated to CLIP's 77 positions (``long_prompts = False``).

Phases: the prompt (and for img2img / inpaint the init image, and the inpaint mask) is
encoded in ``encode``; ``denoise`` runs from the first step to the last one — for hires both
passes, and the upscale between them (with the ``image`` upscaler that includes a VAE decode
and encode); the last step's callback splits ``denoise`` from ``decode`` (VAE decode and
post-processing to an array), so the decode runs as the pipeline runs it, offload hooks
included. ``timer.step()`` follows every pipeline step: ``len(timesteps)`` calls for txt2img
(``steps`` for first-order samplers), the strength-reduced count for img2img / inpaint, and
for hires the sum of both passes (``steps + min(int(steps * strength), steps)`` for a
first-order sampler). LoRA / embedding files are loaded inside the generation before
``encode`` on their first use in the session (a warm-up generation absorbs that).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from backends.base import (
    SDXL_CONTROLNET_UNSUPPORTED,
    TORCH_DTYPES,
    Backend,
    ControlRef,
    Output,
    Request,
    Session,
)
from backends.diffusers_features import LoraAdapters, TextualInversions
from harness.errors import UnsupportedError, UserError
from harness.vocabulary import split_sampler

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from harness.matrix import Cell
    from harness.measure import GenerationTimer
    from models.sources import ResolvedModel

WORKFLOWS: tuple[str, ...] = ("txt2img", "img2img", "inpaint", "hires")
#: Input channels of an inpainting UNet: 4 noisy latents + 1 mask + 4 masked-image latents.
INPAINT_IN_CHANNELS = 9
#: The workflows a cell may name (the harness turns outpaint into inpaint).
CELL_WORKFLOWS: tuple[str, ...] = (*WORKFLOWS, "outpaint")

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
        True,
    ),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}, True),
    "ddim": ("DDIMScheduler", {}, False),
    "deis": ("DEISMultistepScheduler", {}, False),
    "unipc": ("UniPCMultistepScheduler", {}, False),
    # the release scheduler of Kandinsky 2.2's decoder and DeepFloyd IF's stages
    "ddpm": ("DDPMScheduler", {}, False),
}
_NO_KARRAS = {"EulerAncestralDiscreteScheduler", "DDIMScheduler", "DDPMScheduler"}


#: Pipeline class names per family (:data:`models.specs.FAMILIES`) and workflow; SD 1.x and
#: SD 2.x share theirs.
PIPELINES: dict[str, dict[str, str]] = {
    "sd": {
        "txt2img": "StableDiffusionPipeline",
        "img2img": "StableDiffusionImg2ImgPipeline",
        "inpaint": "StableDiffusionInpaintPipeline",
    },
    "sdxl": {
        "txt2img": "StableDiffusionXLPipeline",
        "img2img": "StableDiffusionXLImg2ImgPipeline",
        "inpaint": "StableDiffusionXLInpaintPipeline",
    },
}


def pipeline_class(family: str, workflow: str) -> Any:
    """The diffusers pipeline class of ``workflow`` for a model of ``family``."""
    import diffusers

    return getattr(diffusers, PIPELINES["sdxl" if family == "sdxl" else "sd"][workflow])


def model_family(model: ResolvedModel) -> str:
    """The family of a resolved model: its zoo spec's, else (a hub folder of a model the zoo
    does not know) SDXL when its ``model_index.json`` names an SDXL pipeline."""
    from models.specs import SPECS

    spec = SPECS.get(model.spec_name or "")
    if spec is not None:
        return spec.family
    index = model.path / "model_index.json" if model.path.is_dir() else None
    if index is not None and index.is_file():
        import json

        if "XL" in str(json.loads(index.read_text()).get("_class_name", "")):
            return "sdxl"
    return "sd1"


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


def make_scheduler(sampler: str, base_config: dict[str, Any], seed: int = 0) -> Any:
    """A fresh scheduler for ``sampler`` built from the model's scheduler config.

    ``seed`` seeds the Brownian tree of ``dpmpp_sde``, which otherwise draws its seed from
    torch's global RNG (a different image every time).
    """
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
    if base == "dpmpp_sde":
        config["noise_sampler_seed"] = seed
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
    missing = [
        name for name, prefix in prefixes.items() if not any(k.startswith(prefix) for k in keys)
    ]
    if missing:
        return (
            f"no {', '.join(missing)} weights (keys starting with "
            + ", ".join(repr(prefixes[name]) for name in missing)
            + ")"
        )
    return "some weights of the configured architecture are missing (an architecture mismatch)"


def denoising_steps(steps: int, strength: float) -> int:
    """Steps an img2img / inpaint pass runs: diffusers' ``get_timesteps`` rule."""
    return min(int(steps * strength), steps)


def _pixels(image: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[H, W, 3]`` in ``[0, 1]`` → ``[1, 3, H, W]`` in ``[-1, 1]`` (the VAE's input range)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    return (tensor.permute(2, 0, 1)[None] * 2.0 - 1.0).to(device=device, dtype=dtype)


def _batched(latents: torch.Tensor, batch: int) -> torch.Tensor:
    """``latents`` of batch 1 (or ``batch``) repeated to ``batch``."""
    if latents.shape[0] == batch:
        return latents
    if latents.shape[0] != 1:
        raise ValueError(f"latents of batch {latents.shape[0]} cannot make a batch of {batch}")
    return latents.repeat(batch, 1, 1, 1)


class DiffusersSession(Session):
    """A loaded ``StableDiffusionPipeline`` and the workflow pipelines sharing its components."""

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        device: torch.device,
        dtype: torch.dtype,
        offload: str = "none",
        family: str = "sd1",
        prediction: str | None = None,
    ) -> None:
        """``prediction``: ``eps`` / ``v`` when it is not the model's scheduler config's
        (:attr:`models.sources.ResolvedModel.prediction`)."""
        self.pipe = pipe
        #: Where the pipeline runs (its offload hooks' device under medvram / lowvram). diffusers'
        #: ``_execution_device`` walks every module of every component on each read: read once
        #: here, not in every generation.
        self.execution_device: torch.device = pipe._execution_device
        #: :data:`models.specs.FAMILIES`: picks the pipelines (SDXL's for ``sdxl``).
        self.family = family
        self.device = device
        self.dtype = dtype
        self.offload = offload
        self.base_scheduler_config = dict(pipe.scheduler.config)
        if prediction is not None:
            from models.specs import PREDICTION_TYPES

            self.base_scheduler_config["prediction_type"] = PREDICTION_TYPES[prediction]
        self.latent_channels = int(pipe.vae.config.latent_channels)
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.unet_in_channels = int(pipe.unet.config.in_channels)
        self._sampler: tuple[str, int] | None = None
        #: The request the last :meth:`prepare` set up (kept, so its identity stays unique).
        self._prepared: Request | None = None
        #: img2img / inpaint pipelines (``from_pipe``), built on first use.
        self._workflow_pipes: dict[str, DiffusionPipeline] = {}
        #: ControlNets by the file or folder they came from, loaded once per session.
        self._controlnets: dict[Path, Any] = {}
        #: ControlNet pipelines by (workflow, the nets' sources), built on first use.
        self._control_pipes: dict[tuple[str, tuple[Path, ...]], DiffusionPipeline] = {}
        #: The running generation's timer (the ControlNets' hooks time their forwards).
        self._timer: GenerationTimer | None = None
        self.loras = LoraAdapters(pipe)
        self.embeddings = TextualInversions(pipe)

    # -- pipelines and scheduler ----------------------------------------------------------

    def _use_sampler(self, sampler: str, seed: int) -> None:
        if (sampler, seed) != self._sampler:
            self.pipe.scheduler = make_scheduler(sampler, self.base_scheduler_config, seed)
            self._sampler = (sampler, seed)

    def _controlnet(self, ref: ControlRef) -> Any:
        """The ``ControlNetModel`` of ``ref`` (its folder, else its single file read with its
        config folder, offline), in the session's dtype, with hooks that time its forward."""
        from diffusers import ControlNetModel

        source = ref.folder or ref.source
        net = self._controlnets.get(source)
        if net is not None:
            return net
        common: dict[str, Any] = {"torch_dtype": self.dtype, "local_files_only": True}
        if ref.folder is not None:
            net = ControlNetModel.from_pretrained(str(ref.folder), **common)
        else:
            if ref.config is None:
                raise UserError(
                    f"controlnet '{ref.source}': a single file of an architecture the zoo does "
                    "not know, and no config folder; diffusers reads a ControlNet single file "
                    "only with its config (offline)"
                )
            net = ControlNetModel.from_single_file(
                str(ref.source), config=str(ref.config), **common
            )
        net.eval()
        if self.offload == "none":
            net.to(self.device)
        net.register_forward_pre_hook(lambda *_: self._time_controlnet(begin=True))
        net.register_forward_hook(lambda *_: self._time_controlnet(begin=False))
        self._controlnets[source] = net
        return net

    def _time_controlnet(self, *, begin: bool) -> None:
        if self._timer is not None:
            (self._timer.begin_part if begin else self._timer.end_part)("controlnet")

    def _control_pipeline(self, kind: str, controls: tuple[ControlRef, ...]) -> DiffusionPipeline:
        """The ControlNet pipeline of ``kind`` for ``controls`` (one net, or a
        ``MultiControlNetModel`` of several), sharing the session's components."""
        from diffusers import (
            MultiControlNetModel,
            StableDiffusionControlNetImg2ImgPipeline,
            StableDiffusionControlNetInpaintPipeline,
            StableDiffusionControlNetPipeline,
        )

        if self.family == "sdxl":
            raise UnsupportedError(SDXL_CONTROLNET_UNSUPPORTED)
        nets = tuple(self._controlnet(ref) for ref in controls)
        key = (kind, tuple(ref.folder or ref.source for ref in controls))
        pipe = self._control_pipes.get(key)
        if pipe is None:
            pipeline_class = {
                "txt2img": StableDiffusionControlNetPipeline,
                "img2img": StableDiffusionControlNetImg2ImgPipeline,
                "inpaint": StableDiffusionControlNetInpaintPipeline,
            }[kind]
            controlnet = nets[0] if len(nets) == 1 else MultiControlNetModel(list(nets))
            pipe = pipeline_class.from_pipe(self.pipe, controlnet=controlnet, dtype=self.dtype)
            pipe.set_progress_bar_config(disable=True)
            if self.offload == "medvram":
                pipe.enable_model_cpu_offload(device=self.device)
            elif self.offload == "lowvram":
                pipe.enable_sequential_cpu_offload(device=self.device)
            self._control_pipes[key] = pipe
        pipe.scheduler = self.pipe.scheduler
        return pipe

    def _control_kwargs(self, request: Request, kind: str) -> dict[str, Any]:
        """The ControlNet arguments of a pipeline call (none without controls)."""
        if not request.controls:
            return {}
        if request.control_mode == "prompt":
            raise UnsupportedError(
                "control mode prompt (My prompt is more important): diffusers has no soft "
                "injection on both passes; its guess_mode is the controlnet mode"
            )
        device = self.execution_device
        images = [
            torch.from_numpy(np.ascontiguousarray(ref.image, dtype=np.float32))
            .permute(2, 0, 1)[None]
            .to(device)
            for ref in request.controls
        ]
        scales = [ref.scale for ref in request.controls]
        single = len(images) == 1
        return {
            "image" if kind == "txt2img" else "control_image": images[0] if single else images,
            "controlnet_conditioning_scale": scales[0] if single else scales,
            "guess_mode": request.control_mode == "controlnet",
            "control_guidance_start": request.control_start,
            "control_guidance_end": request.control_end,
        }

    def _pipeline(
        self, kind: str, controls: tuple[ControlRef, ...] = ()
    ) -> DiffusionPipeline:
        """The pipeline of ``kind`` (txt2img | img2img | inpaint) with the session's scheduler;
        with ``controls``, its ControlNet pipeline."""
        if controls:
            return self._control_pipeline(kind, controls)
        if kind == "txt2img":
            return self.pipe
        pipe = self._workflow_pipes.get(kind)
        if pipe is None:
            # dtype: from_pipe casts the (shared!) components to it, float32 by default.
            pipe = pipeline_class(self.family, kind).from_pipe(self.pipe, dtype=self.dtype)
            pipe.set_progress_bar_config(disable=True)
            if self.offload == "medvram":
                # Re-hooks the shared components for this pipeline, so that its calls end
                # with every component offloaded, as the base pipeline's do. Sequential
                # offload (lowvram) hooks live on the modules themselves and need nothing.
                pipe.enable_model_cpu_offload(device=self.device)
            self._workflow_pipes[kind] = pipe
        pipe.scheduler = self.pipe.scheduler
        return pipe

    @contextmanager
    def _start_noise(
        self, pipe: DiffusionPipeline, noise: torch.Tensor, init: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Make ``pipe.prepare_latents`` start from the harness's ``noise``.

        diffusers' img2img and inpaint ``prepare_latents`` draw their noise from the
        generator (and the inpaint one ignores a ``latents=`` argument below strength 1); this
        replaces the method on the instance for the duration of one call with one that does the
        same arithmetic — ``add_noise(init, noise, t_start)``, or ``noise * init_noise_sigma``
        for inpaint at strength 1 — on ``noise``. ``image`` is latents here (the session
        encodes the init image itself), except in the ControlNet inpaint pipeline, which takes
        pixels only: there the session's ``init`` latents stand for them, and the pipeline's
        own VAE encode (of the masked image) takes the posterior's mode as the session does.
        """
        from diffusers import (
            StableDiffusionControlNetInpaintPipeline,
            StableDiffusionInpaintPipeline,
            StableDiffusionXLInpaintPipeline,
        )

        def img2img_latents(
            image: torch.Tensor,
            timestep: torch.Tensor,
            batch_size: int,
            num_images_per_prompt: int,
            dtype: torch.dtype,
            device: torch.device,
            generator: Any = None,
            add_noise: bool = True,  # SDXL's; always True here (no denoising_start)
        ) -> torch.Tensor:
            batch = batch_size * num_images_per_prompt
            init = _batched(image.to(device=device, dtype=dtype), batch)
            start = noise.to(device=device, dtype=dtype)
            return pipe.scheduler.add_noise(init, start, timestep)

        def inpaint_latents(
            batch_size: int,
            num_channels_latents: int,
            height: int,
            width: int,
            dtype: torch.dtype,
            device: torch.device,
            generator: Any,
            latents: torch.Tensor | None = None,
            image: torch.Tensor | None = None,
            timestep: torch.Tensor | None = None,
            is_strength_max: bool = True,
            add_noise: bool = True,  # SDXL's; always True here (no denoising_start)
            return_noise: bool = False,
            return_image_latents: bool = False,
        ) -> tuple[torch.Tensor, ...]:
            assert image is not None
            if image.shape[1] != num_channels_latents:  # pixels: the session's init latents
                assert init is not None
                image = init
            start = noise.to(device=device, dtype=dtype)
            image_latents = _batched(image.to(device=device, dtype=dtype), batch_size)
            if is_strength_max:
                start_latents = start * pipe.scheduler.init_noise_sigma
            else:
                start_latents = pipe.scheduler.add_noise(image_latents, start, timestep)
            outputs: tuple[torch.Tensor, ...] = (start_latents,)
            if return_noise:
                outputs += (start,)
            if return_image_latents:
                outputs += (image_latents,)
            return outputs

        controlnet_inpaint = isinstance(pipe, StableDiffusionControlNetInpaintPipeline)
        inpaint = controlnet_inpaint or isinstance(
            pipe, StableDiffusionInpaintPipeline | StableDiffusionXLInpaintPipeline
        )
        pipe.prepare_latents = inpaint_latents if inpaint else img2img_latents
        if controlnet_inpaint:
            pipe._encode_vae_image = lambda image, generator=None: self._vae_encode(image)
        try:
            yield
        finally:
            del pipe.prepare_latents  # the class's method again
            if controlnet_inpaint:
                del pipe._encode_vae_image

    # -- generation ------------------------------------------------------------------------

    def prepare(self, request: Request) -> None:
        """The request's checks, scheduler, LoRA adapters, embeddings and workflow pipeline;
        a no-op when called again with the request prepared last (the timed repeats)."""
        if request is self._prepared:
            return
        self._prepared = None
        self._check_request(request)
        self._use_sampler(request.sampler, request.seed)
        self.loras.apply(request.loras)
        self.embeddings.apply(request)
        if request.workflow in ("img2img", "inpaint") or request.controls:
            self._pipeline(request.workflow, request.controls)
        elif request.workflow == "hires":
            self._pipeline("img2img")
        self._prepared = request

    def _check_request(self, request: Request) -> None:
        workflow = request.workflow
        if workflow not in WORKFLOWS:
            raise ValueError(f"workflow {workflow!r}: expected one of {', '.join(WORKFLOWS)}")
        if self.unet_in_channels == INPAINT_IN_CHANNELS and workflow != "inpaint":
            raise UnsupportedError(
                f"workflow {workflow}: the UNet takes {INPAINT_IN_CHANNELS} input channels (an "
                "inpainting model); diffusers runs such a model only in its inpaint pipeline"
            )
        if workflow in ("img2img", "inpaint"):
            image = request.init_image
            if image is None:
                raise ValueError(f"workflow {workflow}: request.init_image is None")
            if image.shape != (request.height, request.width, 3):
                raise ValueError(
                    f"workflow {workflow}: init image is {image.shape[1]}x{image.shape[0]} px "
                    f"(shape {image.shape}), expected {request.width}x{request.height} RGB"
                )
        if workflow == "inpaint":
            assert request.init_image is not None
            mask = request.mask
            if mask is None:
                raise ValueError("workflow inpaint: request.mask is None")
            height, width = request.init_image.shape[:2]
            if mask.shape != (height, width):
                size = f"{mask.shape[1]}x{mask.shape[0]}" if mask.ndim == 2 else str(mask.shape)
                raise ValueError(f"inpaint mask is {size} px but the image is {width}x{height} px")
        if workflow == "hires" and request.hires_noise is None:
            raise ValueError("workflow hires: request.hires_noise is None")
        if request.controls and self.unet_in_channels == INPAINT_IN_CHANNELS:
            raise UnsupportedError(
                "ControlNet with a 9-channel inpainting UNet: not wired on diffusers"
            )

    @torch.no_grad()
    def generate(self, request: Request, timer: GenerationTimer) -> Output:
        self.prepare(request)
        pipe = self.pipe
        device = self.execution_device
        cfg = request.guidance > 1.0
        generator = torch.Generator(device="cpu").manual_seed(request.seed)

        with timer.phase("encode"):
            embeds = pipe.encode_prompt(
                request.prompt,
                device=device,
                num_images_per_prompt=request.batch,
                do_classifier_free_guidance=cfg,
                negative_prompt=request.negative_prompt or None,
            )
            prompt_embeds, negative_embeds = embeds[0], embeds[1]
            encoded = self._encode_inputs(request, device, prompt_embeds.dtype)

        sigmas = request.extra.get("sigmas")
        common: dict[str, Any] = {
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_embeds if cfg else None,
            "num_inference_steps": None if sigmas is not None else request.steps,
            "sigmas": None if sigmas is None else list(map(float, sigmas)),
            "guidance_scale": request.guidance,
            "generator": generator,
        }
        if self.family == "sdxl":  # SDXL's pooled text (an empty negative: zeros, as A1111)
            common["pooled_prompt_embeds"] = embeds[2]
            common["negative_pooled_prompt_embeds"] = embeds[3] if cfg else None
        common.update(self._control_kwargs(request, request.workflow))
        total_steps = request.steps if sigmas is None else len(sigmas)
        self._timer = timer
        try:
            timer.begin("denoise")
            if request.workflow == "txt2img":
                output = self._txt2img(request, timer, common)
            elif request.workflow == "img2img":
                output = self._img2img(
                    encoded["init"], request.noise, request.strength, total_steps, timer, common,
                    request.controls,
                )
            elif request.workflow == "inpaint":
                output = self._inpaint(request, encoded, total_steps, timer, common)
            else:
                output = self._hires(request, total_steps, timer, common)
            timer.end("decode")
        finally:
            self._timer = None
        return output

    def _encode_inputs(
        self, request: Request, device: torch.device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """img2img / inpaint: init latents ``[batch, C, h, w]``; inpaint: also the mask
        ``[1, 1, H, W]`` and the masked-image latents (9-channel UNet; the init latents,
        unused, for a 4-channel one, whose pipeline needs some)."""
        if request.workflow not in ("img2img", "inpaint"):
            return {}
        assert request.init_image is not None
        pixels = _pixels(request.init_image, device, dtype)
        init = _batched(self._vae_encode(pixels), request.batch)
        if request.workflow == "img2img":
            return {"init": init}
        assert request.mask is not None
        mask = torch.from_numpy(np.ascontiguousarray(request.mask, dtype=np.float32))[None, None]
        mask = mask.to(device=device, dtype=dtype)
        if self.unet_in_channels == INPAINT_IN_CHANNELS:
            # diffusers' conditioning image: the [-1, 1] image zeroed (grey) where repainted.
            masked = _batched(self._vae_encode(pixels * (mask < 0.5)), request.batch)
        else:
            masked = init
        return {"init": init, "mask": mask, "masked": masked}

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """The init latents of ``image`` as img2img / inpaint compute them, on the CPU."""
        pixels = _pixels(image, self.execution_device, self.dtype)
        return self._vae_encode(pixels).float().cpu()

    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latents of ``pixels`` in ``[-1, 1]``: the distribution's mode (its mean), not a
        sample, times the scaling factor — deterministic, as the original backend encodes."""
        vae = self.pipe.vae
        latents = vae.encode(pixels).latent_dist.mode()
        return latents * vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        """VAE decode and post-processing to float32 ``[batch, H, W, 3]`` in ``[0, 1]``, as
        the pipelines do it (used where no pipeline step runs before the decode)."""
        vae = self.pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        array = self.pipe.image_processor.postprocess(image.detach(), output_type="np")
        return np.asarray(array, dtype=np.float32)

    def _run(
        self, pipe: DiffusionPipeline, timer: GenerationTimer, *, last_pass: bool, **kwargs: Any
    ) -> tuple[Any, torch.Tensor]:
        """Call ``pipe``, with ``timer.step()`` after each step; return (result, final latents).

        On the last step of the last pass the callback ends ``denoise`` and begins ``decode``.
        """
        final: dict[str, torch.Tensor] = {}

        def on_step_end(
            pipeline: Any, index: int, _timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            timer.step()
            if index == pipeline.num_timesteps - 1:
                final["latents"] = tensors["latents"].detach().clone()
                if last_pass:
                    timer.end("denoise")
                    timer.begin("decode")
            return tensors

        result = pipe(
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
            **kwargs,
        )
        return result, final["latents"]

    def _no_denoising(self, latents: torch.Tensor, timer: GenerationTimer) -> Output:
        """No step left (strength 0): the output is the decoded start latents."""
        timer.end("denoise")
        timer.begin("decode")
        return Output(images=self._decode(latents), latents=latents.detach().clone().float())

    def _txt2img(self, request: Request, timer: GenerationTimer, common: dict[str, Any]) -> Output:
        result, latents = self._run(
            self._pipeline("txt2img", request.controls),
            timer,
            last_pass=True,
            height=request.height,
            width=request.width,
            latents=request.noise.to(device=self.execution_device, dtype=self.dtype),
            output_type="np",
            **common,
        )
        return Output(images=np.asarray(result.images, dtype=np.float32), latents=latents.float())

    def _img2img(
        self,
        init: torch.Tensor,
        noise: torch.Tensor,
        strength: float,
        total_steps: int,
        timer: GenerationTimer,
        common: dict[str, Any],
        controls: tuple[ControlRef, ...] = (),
    ) -> Output:
        """An img2img pass from ``init`` latents (also the hires second pass)."""
        if denoising_steps(total_steps, strength) == 0:
            return self._no_denoising(init, timer)
        pipe = self._pipeline("img2img", controls)
        with self._start_noise(pipe, noise):
            result, latents = self._run(
                pipe,
                timer,
                last_pass=True,
                image=init,
                strength=strength,
                output_type="np",
                **common,
            )
        return Output(images=np.asarray(result.images, dtype=np.float32), latents=latents.float())

    def _inpaint(
        self,
        request: Request,
        encoded: dict[str, torch.Tensor],
        total_steps: int,
        timer: GenerationTimer,
        common: dict[str, Any],
    ) -> Output:
        if denoising_steps(total_steps, request.strength) == 0:
            return self._no_denoising(encoded["init"], timer)
        pipe = self._pipeline("inpaint", request.controls)
        if request.controls:  # the ControlNet pipeline takes pixels (and no masked latents)
            assert request.init_image is not None
            inputs: dict[str, Any] = {"image": request.init_image[None]}
        else:
            inputs = {"image": encoded["init"], "masked_image_latents": encoded["masked"]}
        with self._start_noise(pipe, request.noise, encoded["init"]):
            result, latents = self._run(
                pipe,
                timer,
                last_pass=True,
                mask_image=encoded["mask"],
                **inputs,
                height=request.height,
                width=request.width,
                strength=request.strength,
                output_type="np",
                **common,
            )
        return Output(images=np.asarray(result.images, dtype=np.float32), latents=latents.float())

    def _hires(
        self, request: Request, total_steps: int, timer: GenerationTimer, common: dict[str, Any]
    ) -> Output:
        assert request.hires_noise is not None
        _, latents = self._run(
            self.pipe,
            timer,
            last_pass=False,
            height=request.height,
            width=request.width,
            latents=request.noise.to(device=self.execution_device, dtype=self.dtype),
            output_type="latent",
            **common,
        )
        size = tuple(request.hires_noise.shape[-2:])
        upscaled = self._upscale(latents, request.hires_upscaler, (int(size[0]), int(size[1])))
        return self._img2img(
            upscaled, request.hires_noise, request.strength, total_steps, timer, common
        )

    def _upscale(self, latents: torch.Tensor, upscaler: str, size: tuple[int, int]) -> torch.Tensor:
        """Latents upscaled to ``size`` (latent height, width) by the hires ``upscaler``."""
        if upscaler == "latent":  # A1111's "Latent": bilinear, no antialiasing
            return torch.nn.functional.interpolate(
                latents, size=size, mode="bilinear", align_corners=False
            )
        if upscaler != "image":
            raise ValueError(f"hires_upscaler {upscaler!r}: expected 'latent' or 'image'")
        from PIL import Image

        factor = self.vae_scale_factor
        pictures = self.pipe.image_processor.numpy_to_pil(self._decode(latents))  # 8-bit RGB
        resized = [
            np.asarray(
                picture.resize((size[1] * factor, size[0] * factor), Image.Resampling.LANCZOS),
                dtype=np.float32,
            )
            / 255.0
            for picture in pictures
        ]
        return torch.cat(
            [self._vae_encode(_pixels(image, latents.device, latents.dtype)) for image in resized]
        )

    def close(self) -> None:
        if hasattr(self.pipe, "remove_all_hooks"):
            self.pipe.remove_all_hooks()
        self._workflow_pipes.clear()
        self._control_pipes.clear()
        self._controlnets.clear()
        del self.pipe


def place(pipe: Any, offload: str, device: torch.device) -> None:
    """Put a pipeline on ``device`` by the cell's offload mode: ``medvram`` = model CPU
    offload, ``lowvram`` = sequential CPU offload, ``none`` = all of it on the device."""
    if offload == "medvram":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "lowvram":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)


def _inpainting_model_problem(cell: Cell) -> str | None:
    """A zoo inpainting model (9-channel UNet) runs only inpaint / outpaint here.

    Other models are checked when loaded (:meth:`DiffusersSession._check_request`).
    """
    if cell.base_workflow in ("inpaint", "outpaint"):
        return None
    from models.specs import SPECS

    spec = SPECS.get(cell.model)
    if spec is None or spec.unet.get("in_channels") != INPAINT_IN_CHANNELS:
        return None
    return (
        f"workflow {cell.workflow}: {cell.model} has a {INPAINT_IN_CHANNELS}-channel "
        "inpainting UNet; diffusers runs it only in its inpaint pipeline"
    )


class DiffusersBackend(Backend):
    name = "diffusers"
    #: CLIP's 77 positions; tokens past them are dropped (diffusers warns).
    long_prompts = False
    #: ControlNet pipelines for txt2img and img2img (one net or a MultiControlNetModel).
    controlnet = True

    def unsupported(self, cell: Cell, device: torch.device) -> str | None:
        from backends.diffusers_staged import staged_family, staged_problem
        from models.specs import SPECS

        family = staged_family(cell)
        if family is not None:
            problem = staged_problem(cell, family)
        elif cell.base_workflow not in CELL_WORKFLOWS:
            return f"workflow {cell.workflow}: not implemented by the diffusers backend"
        elif cell.x4_upscaler and cell.model in SPECS:
            return "x4_upscaler: only DeepFloyd IF has a stage III"
        else:
            problem = _inpainting_model_problem(cell)
        if problem is not None:
            return problem
        if cell.offload != "none" and device.type != "cuda":
            mode = {"medvram": "model CPU offload", "lowvram": "sequential CPU offload"}
            return (
                f"offload {cell.offload} ({mode[cell.offload]}) needs a CUDA device; "
                f"device is {device.type}"
            )
        if cell.attention == "xformers" and importlib.util.find_spec("xformers") is None:
            return "attention xformers: the xformers package is not installed"
        return sampler_problem(cell.sampler)

    def imports(self) -> None:
        import diffusers
        import transformers  # noqa: F401 - the pipelines' text encoder and tokenizer

        for name in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                     "StableDiffusionInpaintPipeline", "EulerDiscreteScheduler"):
            getattr(diffusers, name)  # diffusers imports its classes on first access

    def load(self, cell: Cell, model: ResolvedModel, device: torch.device) -> Session:
        if model.stages is not None:  # Kandinsky 2.2, DeepFloyd IF
            from backends.diffusers_staged import load_staged

            self._quiet()
            return load_staged(cell, model, device)
        if cell.x4_upscaler:
            raise UnsupportedError("x4_upscaler: only DeepFloyd IF has a stage III")
        family = model_family(model)
        pipeline = pipeline_class(family, "txt2img")
        dtype = TORCH_DTYPES[cell.dtype]
        self._quiet()
        common: dict[str, Any] = {
            "dtype": dtype,
            "local_files_only": True,
        }
        if family != "sdxl":  # SDXL's pipelines have no safety checker
            common |= {"safety_checker": None, "requires_safety_checker": False}
        if model.is_single_file:
            if model.config_dir is None:
                raise UserError(
                    f"model {model.reference!r}: no config folder for this single file; "
                    "the diffusers backend needs the architecture's configs"
                )
            try:
                pipe = pipeline.from_single_file(
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
            pipe = pipeline.from_pretrained(str(model.path), **common)
        pipe.set_progress_bar_config(disable=True)
        self._configure(pipe, cell, device)
        return DiffusersSession(pipe, device, dtype, cell.offload, family, model.prediction)

    @staticmethod
    def _quiet() -> None:
        """No progress bars, no load-time advice (it would interleave the run's progress)."""
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        diffusers_logging.set_verbosity_error()

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
        place(pipe, cell.offload, device)
        if cell.compile != "none":
            pipe.unet = torch.compile(  # type: ignore[assignment]
                pipe.unet, mode=cell.compile, fullgraph=cell.fullgraph
            )
