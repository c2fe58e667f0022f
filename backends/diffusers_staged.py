"""Multi-stage families on the diffusers backend: Kandinsky 2.2 and DeepFloyd IF.

Each stage is its release's diffusers pipeline, loaded from its own folder
(:attr:`models.sources.ResolvedModel.stages`) and run in a chain:

============  ===========================================================================
family        stages
============  ===========================================================================
kandinsky22   ``prior`` (``KandinskyV22PriorPipeline``: CLIP text encoder, the prior
              denoising an image embedding, and — for an empty negative prompt — the CLIP
              image encoder's embedding of a blank image), then ``decoder``
              (``KandinskyV22Pipeline``, or ``KandinskyV22Img2ImgPipeline`` for img2img:
              a UNet on MoVQ latents conditioned on the image embeddings, MoVQ decode)
deepfloyd-if  ``stage_1`` (``IFPipeline``: T5 encodes the prompt once for every stage, a pixel
              UNet makes the image at a quarter of the output size), ``stage_2``
              (``IFSuperResolutionPipeline``: ×4 in pixels, on stage I's T5 states, the
              upscaled image noised to ``noise_level`` 250) and with ``x4_upscaler`` on
              ``stage_3`` (``StableDiffusionUpscalePipeline``, ×4 again, noise level 100)
============  ===========================================================================

**Sizes.** ``resolution`` is the size of the images the chain produces. Kandinsky's decoder
works on multiples of 64 px (MoVQ's factor 8, squared, as diffusers' ``downscale_height_and_
width`` rounds); IF's stage I runs at a quarter of it (a sixteenth with the x4 upscaler).

**Steps, guidance, schedulers.** Every stage runs ``steps`` at ``guidance`` unless the
``stage_steps`` / ``stage_guidance`` axes say otherwise for it (``prior=25``). The prior
keeps its release scheduler (UnCLIP); ``sampler`` picks the scheduler of the other stages
from the session's table (:data:`backends.diffusers_backend.SCHEDULERS`), ``ddpm`` being
the releases' own. IF's pipelines read the scheduler's learned-variance setting, so IF runs
``ddpm`` only.

**Noise.** The harness draws every stage's start noise: :attr:`Request.noise` is the
decoder's latents / IF stage I's image, :attr:`Request.stage_noise` the prior's embedding
latents (``2 × batch`` rows: the prompt's and the negative prompt's; the first ``batch``
without a negative prompt), IF stage II's image and the x4 upscaler's latents. The pipelines
take them through ``latents=`` where they have it, else through their
``prepare_intermediate_images`` / ``prepare_latents`` replaced for the call (as the SD
workflows do). Noise drawn *during* the steps (DDPM's and UnCLIP's variance, IF stage II's
noising of the upscaled image, the x4 upscaler's) is the pipeline generator's, seeded from
``request.seed`` on every generation: a seed gives the same images.

**Timing.** ``timer.begin_stage`` / ``end_stage`` wrap each stage's pipeline call; a forward
pre-hook on each stage's denoiser (the prior, the UNets) marks where its denoising starts,
and each step's callback calls ``timer.step()``. Phases: ``encode`` from the start to the
first stage's first denoiser call (the prior's CLIP encoders; IF's T5), ``denoise`` from
there to the last stage's last step — the stages in between, the init image's MoVQ encode
(img2img) and IF's upscaling included — and ``decode`` after it (MoVQ decode; the x4
upscaler's VAE decode; for IF without it, the conversion of the pixels to an array).

**Offload.** ``medvram`` = each stage's ``enable_model_cpu_offload``, ``lowvram`` =
``enable_sequential_cpu_offload``; both need CUDA, as for the SD families.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.base import TORCH_DTYPES, Output, Request, Session
from backends.diffusers_backend import denoising_steps, make_scheduler, place
from harness.cell import Cell
from harness.errors import UnsupportedError, UserError
from harness.measure import GenerationTimer
from models.sources import ResolvedModel
from models.staged import OPTIONAL_STAGE, STAGED_SPECS

#: Workflows each family runs here (Kandinsky 2.2's img2img is its decoder's).
FAMILY_WORKFLOWS: dict[str, tuple[str, ...]] = {
    "kandinsky22": ("txt2img", "img2img"),
    "deepfloyd-if": ("txt2img",),
}
#: The component each stage denoises with.
DENOISERS: dict[str, str] = {"prior": "prior"}
#: IF stage II's and the x4 upscaler's noise levels (the releases' documented defaults).
NOISE_LEVELS: dict[str, int] = {"stage_2": 250, OPTIONAL_STAGE: 100}


def staged_family(cell: Cell) -> str | None:
    """The multi-stage family of a cell's zoo model (None for others, or not a zoo name)."""
    spec = STAGED_SPECS.get(cell.model)
    return spec.family if spec is not None else None


def staged_problem(cell: Cell, family: str) -> str | None:
    """Why the diffusers backend cannot run ``cell`` on a model of ``family``, or None."""
    workflows = FAMILY_WORKFLOWS[family]
    if cell.workflow not in workflows:
        return (f"workflow {cell.workflow}: {family} runs {', '.join(workflows)} here "
                "(its releases' pipelines)")
    for axis, value in (("lora", cell.lora), ("embedding", cell.embedding)):
        if value != "none":
            return f"{axis} with {family}: not wired (the zoo's files are SD-shaped)"
    if cell.x4_upscaler and family != "deepfloyd-if":
        return "x4_upscaler: only DeepFloyd IF has a stage III"
    if family == "deepfloyd-if" and cell.sampler != "ddpm":
        return (f"sampler {cell.sampler}: DeepFloyd IF's pipelines need its learned-variance "
                "DDPM scheduler; expected sampler ddpm")
    return None


def _to_images(pixels: torch.Tensor) -> np.ndarray:
    """``[-1, 1]`` pixels ``[B, 3, H, W]`` -> float32 ``[B, H, W, 3]`` in ``[0, 1]`` (IF's)."""
    images = (pixels.float() / 2 + 0.5).clamp(0, 1)
    return images.permute(0, 2, 3, 1).cpu().numpy()


class StagedSession(Session):
    """A chain of loaded pipelines, one per stage, in running order."""

    def __init__(self, family: str, pipes: dict[str, Any], device: torch.device,
                 dtype: torch.dtype, offload: str) -> None:
        self.family = family
        self.pipes = pipes
        self.device = device
        self.dtype = dtype
        self.offload = offload
        #: Each stage's execution device, read once (diffusers walks every module per read).
        self.devices = {name: pipe._execution_device for name, pipe in pipes.items()}
        self.base_configs = {name: dict(pipe.scheduler.config) for name, pipe in pipes.items()}
        self._sampler: tuple[str, int] | None = None
        self._prepared: Request | None = None
        #: The prepared request's steps and guidance per stage (:meth:`_stage_values`).
        self._values: tuple[dict[str, int], dict[str, float]] = ({}, {})
        self._img2img: Any = None
        #: The running generation's timer, and the stages whose denoising has started.
        self._timer: GenerationTimer | None = None
        self._started: set[str] = set()
        first = next(iter(pipes))
        for name, pipe in pipes.items():
            denoiser = getattr(pipe, DENOISERS.get(name, "unet"))
            denoiser.register_forward_pre_hook(self._denoiser_hook(name, first=name == first))
        if family == "kandinsky22":
            movq = pipes["decoder"].movq
            self.latent_channels = int(movq.config.latent_channels)
            self.vae_scale_factor = 2 ** (len(movq.config.block_out_channels) - 1)
        else:  # pixels: stage I at a quarter (a sixteenth with the x4 upscaler) of the output
            self.latent_channels = int(pipes["stage_1"].unet.config.in_channels)
            self.vae_scale_factor = 4 ** (len(pipes) - 1)

    # -- shapes and noise -------------------------------------------------------------------

    def stage_noise_shapes(self, batch: int, width: int, height: int) -> dict[str, tuple[int, ...]]:
        if self.family == "kandinsky22":
            return {"prior": (2 * batch, int(self.pipes["prior"].prior.config.embedding_dim))}
        shapes: dict[str, tuple[int, ...]] = {}
        size = (height // self.vae_scale_factor * 4, width // self.vae_scale_factor * 4)
        shapes["stage_2"] = (batch, 3, *size)
        if OPTIONAL_STAGE in self.pipes:
            channels = int(self.pipes[OPTIONAL_STAGE].vae.config.latent_channels)
            shapes[OPTIONAL_STAGE] = (batch, channels, *size)
        return shapes

    def _check_size(self, request: Request) -> None:
        width, height = request.width, request.height
        if self.family == "kandinsky22":
            step = self.vae_scale_factor**2
            what = "Kandinsky 2.2 decodes multiples of"
        else:
            levels = len(self.pipes["stage_1"].unet.config.block_out_channels)
            step = self.vae_scale_factor * 2 ** (levels - 1)
            what = (f"DeepFloyd IF's stage I UNet (at 1/{self.vae_scale_factor} of the output) "
                    "needs multiples of")
        if width % step or height % step:
            raise UserError(f"resolution {width}x{height}: {what} {step} px")

    # -- set-up -------------------------------------------------------------------------------

    def _stage_values(self, request: Request) -> tuple[dict[str, int], dict[str, float]]:
        """Each stage's steps and guidance: the request's, where ``stage_steps`` /
        ``stage_guidance`` name no other."""
        for axis, values in (("stage_steps", request.stage_steps),
                             ("stage_guidance", request.stage_guidance)):
            unknown = sorted(set(values) - set(self.pipes))
            if unknown:
                raise UserError(f"{axis}: {', '.join(unknown)} is no stage of this model; "
                                f"its stages: {', '.join(self.pipes)}")
        steps = {name: int(request.stage_steps.get(name, request.steps)) for name in self.pipes}
        guidance = {name: float(request.stage_guidance.get(name, request.guidance))
                    for name in self.pipes}
        return steps, guidance

    def _use_sampler(self, sampler: str, seed: int) -> None:
        if (sampler, seed) == self._sampler:
            return
        for name, pipe in self.pipes.items():
            if name != "prior":  # the prior keeps its release's UnCLIP scheduler
                pipe.scheduler = make_scheduler(sampler, self.base_configs[name], seed)
        self._sampler = (sampler, seed)  # the img2img twin takes it in _decoder

    def _decoder(self, workflow: str) -> Any:
        """Kandinsky's decoder pipeline of ``workflow``: the loaded one, or its img2img twin
        sharing every component (built on first use)."""
        decoder = self.pipes["decoder"]
        if workflow != "img2img":
            return decoder
        if self._img2img is None:
            from diffusers import KandinskyV22Img2ImgPipeline

            pipe = KandinskyV22Img2ImgPipeline(**decoder.components)
            pipe.set_progress_bar_config(disable=True)
            if self.offload == "medvram":
                pipe.enable_model_cpu_offload(device=self.device)
            self._img2img = pipe
        self._img2img.scheduler = decoder.scheduler
        return self._img2img

    def prepare(self, request: Request) -> None:
        if request is self._prepared:
            return
        self._prepared = None
        workflows = FAMILY_WORKFLOWS[self.family]
        if request.workflow not in workflows:
            raise UnsupportedError(f"workflow {request.workflow}: {self.family} runs "
                                   f"{', '.join(workflows)} here")
        if request.loras or request.embeddings or request.controls:
            raise UnsupportedError(f"LoRA, embeddings and ControlNet with {self.family}: not wired")
        self._check_size(request)
        self._values = self._stage_values(request)
        if request.workflow == "img2img" and request.init_image is None:
            raise ValueError("workflow img2img: request.init_image is None")
        self._use_sampler(request.sampler, request.seed)
        if self.family == "kandinsky22":
            self._decoder(request.workflow)
        self._prepared = request

    # -- timing -------------------------------------------------------------------------------

    def _denoiser_hook(self, stage: str, first: bool) -> Callable[..., None]:
        def hook(_module: Any, _args: Any) -> None:
            timer = self._timer
            if timer is None or stage in self._started:
                return
            self._started.add(stage)
            if first:
                timer.end("encode")
                timer.begin("denoise")
            else:
                timer.restart_steps()

        return hook

    def _on_step(self, pipe: Any, last_stage: bool,
                 final: dict[str, torch.Tensor]) -> Callable[[int, torch.Tensor], None]:
        """What each step of a stage reports: ``timer.step()``; on its last step the final
        latents, and on the last stage's last step the switch from ``denoise`` to
        ``decode``."""
        timer = self._timer
        assert timer is not None

        def step(index: int, latents: torch.Tensor) -> None:
            timer.step()
            # the pipelines that count their steps say so; IF's run every scheduler timestep
            total = getattr(pipe, "_num_timesteps", None) or len(pipe.scheduler.timesteps)
            if index == total - 1:
                final["latents"] = latents.detach().clone()
                if last_stage:
                    timer.end("denoise")
                    timer.begin("decode")

        return step

    @contextmanager
    def _noise(self, pipe: Any, method: str,
               replacement: Callable[..., torch.Tensor] | None) -> Iterator[None]:
        """Replace ``pipe.METHOD`` for one call with ``replacement`` (which starts from the
        harness's noise); nothing to replace: as it is."""
        if replacement is None:
            yield
            return
        setattr(pipe, method, replacement)
        try:
            yield
        finally:
            delattr(pipe, method)

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, request: Request, timer: GenerationTimer) -> Output:
        self.prepare(request)
        steps, guidance = self._values
        self._timer = timer
        self._started = set()
        try:
            timer.begin("encode")
            if self.family == "kandinsky22":
                output = self._kandinsky(request, timer, steps, guidance)
            else:
                output = self._deepfloyd(request, timer, steps, guidance)
            timer.end("decode")
        finally:
            self._timer = None
        return output

    def _generator(self, request: Request) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(request.seed)

    def _kandinsky(self, request: Request, timer: GenerationTimer, steps: dict[str, int],
                   guidance: dict[str, float]) -> Output:
        generator = self._generator(request)
        prior = self.pipes["prior"]
        negative = request.negative_prompt or None
        rows = request.batch * (2 if negative is not None else 1)
        prior_noise = request.stage_noise["prior"][:rows]
        final: dict[str, torch.Tensor] = {}
        on_prior = self._on_step(prior, False, {})
        timer.begin_stage("prior")
        embeds = prior(
            request.prompt,
            negative_prompt=negative,
            num_images_per_prompt=request.batch,
            num_inference_steps=steps["prior"],
            guidance_scale=guidance["prior"],
            generator=generator,
            latents=prior_noise.to(device=self.devices["prior"], dtype=self.dtype),
            output_type="pt",
            callback_on_step_end=lambda _p, i, _t, kw: (on_prior(i, kw["latents"]), kw)[1],
        )
        timer.end_stage("prior")
        decoder = self._decoder(request.workflow)
        device = self.devices["decoder"]
        noise = request.noise.to(device=device, dtype=self.dtype)
        kwargs: dict[str, Any] = {}
        replacement: Callable[..., torch.Tensor] | None = None
        if request.workflow == "img2img":
            assert request.init_image is not None
            image = torch.from_numpy(np.ascontiguousarray(request.init_image.transpose(2, 0, 1)))
            kwargs |= {"image": image[None].repeat(request.batch, 1, 1, 1),
                       "strength": request.strength}

            def prepare_latents(latents: torch.Tensor, timestep: torch.Tensor, *_args: Any,
                                **_kwargs: Any) -> torch.Tensor:
                init = latents.to(device=device, dtype=self.dtype)
                return decoder.scheduler.add_noise(init, noise, timestep)

            replacement = prepare_latents
        else:
            kwargs["latents"] = noise
        on_decoder = self._on_step(decoder, True, final)
        timer.begin_stage("decoder")
        if request.workflow == "img2img" and denoising_steps(steps["decoder"],
                                                             request.strength) == 0:
            return self._no_denoising(request, timer)
        with self._noise(decoder, "prepare_latents", replacement):
            result = decoder(
                image_embeds=embeds.image_embeds,
                negative_image_embeds=embeds.negative_image_embeds,
                height=request.height,
                width=request.width,
                num_inference_steps=steps["decoder"],
                guidance_scale=guidance["decoder"],
                generator=generator,
                output_type="np",
                callback_on_step_end=lambda _p, i, _t, kw: (on_decoder(i, kw["latents"]), kw)[1],
                **kwargs,
            )
        timer.end_stage("decoder")
        return Output(images=np.asarray(result.images, dtype=np.float32),
                      latents=final["latents"].float())

    def _movq_latents(self, image: np.ndarray) -> torch.Tensor:
        """MoVQ latents of ``image`` (``[H, W, 3]`` in ``[0, 1]``) as the img2img pipeline
        computes its init latents: its image processor, then the encoder (no quantisation)."""
        decoder = self._decoder("img2img")
        pixels = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
        height, width = image.shape[:2]
        pixels = decoder.image_processor.preprocess(pixels, height, width)
        pixels = pixels.to(device=self.devices["decoder"], dtype=self.dtype)
        return decoder.movq.encode(pixels)["latents"]

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        if self.family != "kandinsky22":
            raise NotImplementedError(f"{self.family} has no image encoder (txt2img only)")
        return self._movq_latents(image).float().cpu()

    def _no_denoising(self, request: Request, timer: GenerationTimer) -> Output:
        """img2img with no decoder step left (strength 0): the init image's latents, decoded."""
        assert request.init_image is not None
        decoder = self._decoder("img2img")
        latents = self._movq_latents(request.init_image).repeat(request.batch, 1, 1, 1)
        timer.end("denoise")
        timer.begin("decode")
        pixels = decoder.movq.decode(latents, force_not_quantize=True)["sample"]
        images = decoder.image_processor.postprocess(pixels, "np")
        timer.end_stage("decoder")
        return Output(images=np.asarray(images, dtype=np.float32), latents=latents.float())

    def _deepfloyd(self, request: Request, timer: GenerationTimer, steps: dict[str, int],
                   guidance: dict[str, float]) -> Output:
        generator = self._generator(request)
        names = list(self.pipes)
        stage_1 = self.pipes["stage_1"]
        device = self.devices["stage_1"]
        factor = self.vae_scale_factor
        final: dict[str, torch.Tensor] = {}
        timer.begin_stage("stage_1")
        cfg = {name: value > 1.0 for name, value in guidance.items()}
        prompt_embeds, negative_embeds = stage_1.encode_prompt(
            request.prompt,
            do_classifier_free_guidance=any(cfg.values()),
            num_images_per_prompt=request.batch,
            device=device,
            negative_prompt=request.negative_prompt or None,
            clean_caption=False,
        )
        images: torch.Tensor | None = None
        for name in names:
            pipe = self.pipes[name]
            last = name == names[-1]
            if name != "stage_1":
                timer.begin_stage(name)
            start = (request.noise if name == "stage_1" else request.stage_noise[name])
            start = start.to(device=self.devices[name], dtype=self.dtype)
            step = self._on_step(pipe, last, final)
            common: dict[str, Any] = {
                "num_inference_steps": steps[name],
                "guidance_scale": guidance[name],
                "generator": generator,
                "callback": lambda i, _t, latents, step=step: step(i, latents),
                "callback_steps": 1,
            }
            if name == OPTIONAL_STAGE:
                result = pipe(
                    prompt=[request.prompt] * request.batch,
                    negative_prompt=([request.negative_prompt] * request.batch
                                     if request.negative_prompt else None),
                    image=images,
                    latents=start,
                    noise_level=NOISE_LEVELS[name],
                    output_type="np",
                    **common,
                )
                output_images = np.asarray(result.images, dtype=np.float32)
            else:
                embeds: dict[str, Any] = {
                    "prompt_embeds": prompt_embeds,
                    "negative_prompt_embeds": negative_embeds if cfg[name] else None,
                }
                size: dict[str, Any]
                if name == "stage_1":
                    size = {"height": request.height // factor,
                            "width": request.width // factor}
                else:
                    size = {"height": start.shape[2], "width": start.shape[3], "image": images,
                            "noise_level": NOISE_LEVELS[name]}

                def intermediate(*_args: Any, start: torch.Tensor = start,
                                 pipe: Any = pipe) -> torch.Tensor:
                    return start * pipe.scheduler.init_noise_sigma

                with self._noise(pipe, "prepare_intermediate_images", intermediate):
                    images = pipe(output_type="pt", clean_caption=False, **embeds, **size,
                                  **common).images
                output_images = None
            timer.end_stage(name)
        if output_images is None:
            assert images is not None
            output_images = _to_images(images)
        return Output(images=output_images, latents=final["latents"].float())

    def close(self) -> None:
        for pipe in self.pipes.values():
            if hasattr(pipe, "remove_all_hooks"):
                pipe.remove_all_hooks()
        self._img2img = None
        self.pipes.clear()


def load_staged(cell: Cell, model: ResolvedModel, device: torch.device) -> StagedSession:
    """Load each stage of ``model`` (its pipeline class from its ``model_index.json``) in the
    cell's dtype, attention, offload and compile settings."""
    import diffusers

    assert model.stages is not None and model.family is not None
    problem = staged_problem(cell, model.family)
    if problem is not None:
        raise UnsupportedError(problem)
    stages: dict[str, Path] = {
        name: path for name, path in model.stages.items()
        if name != OPTIONAL_STAGE or cell.x4_upscaler
    }
    if cell.x4_upscaler and OPTIONAL_STAGE not in stages:
        raise UserError(f"model {model.reference!r}: x4_upscaler is on, but the model has no "
                        "stage III (x4 upscaler) folder")
    dtype = TORCH_DTYPES[cell.dtype]
    pipes: dict[str, Any] = {}
    for name, path in stages.items():
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            str(path), dtype=dtype, local_files_only=True
        )
        pipe.set_progress_bar_config(disable=True)
        _configure(pipe, DENOISERS.get(name, "unet"), cell, device)
        pipes[name] = pipe
    return StagedSession(model.family, pipes, device, dtype, cell.offload)


def _configure(pipe: Any, denoiser: str, cell: Cell, device: torch.device) -> None:
    """Attention, channels_last, offload and compile of one stage (as the SD pipelines'
    ``_configure``): the
    UNets' ``sdp`` is the processors diffusers picks with torch's SDPA (the added-KV ones for
    these UNets' attention), ``math`` their plain twins."""
    if cell.attention == "math":
        for name in ("unet", "vae", "movq", "prior"):
            module = getattr(pipe, name, None)
            if module is not None and hasattr(module, "set_default_attn_processor"):
                module.set_default_attn_processor()
    elif cell.attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    if cell.channels_last:
        for name in ("unet", "vae", "movq"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.to(memory_format=torch.channels_last)
    place(pipe, cell.offload, device)
    if cell.compile != "none":
        setattr(pipe, denoiser, torch.compile(getattr(pipe, denoiser), mode=cell.compile,
                                              fullgraph=cell.fullgraph))
