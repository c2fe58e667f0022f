"""The original backend: LDM modules, k-diffusion samplers, A1111 memory modes.

:class:`OriginalBackend` loads an original single file (``.safetensors`` / ``.ckpt``) into a
:class:`~.ldm.LatentDiffusion` and returns an :class:`OriginalSession`, which generates the
way the original A1111 / SD.Next backend does: chunked CLIP conditioning with textual
inversion (:mod:`.text`), LoRA patched into the weights (:mod:`.lora`), a k-diffusion sampler
over the discrete schedule (CFG inside the denoiser), VAE decode. Workflows
(:mod:`.workflows`): txt2img; img2img and inpaint (latent masking; mask + masked-image
channels for a 9-channel inpainting UNet) over the last ``int(steps * strength)`` sigmas from
``init + noise * sigmas[0]``; hires fix (txt2img, upscale latents or image, img2img).

Phases: ``encode`` = LoRA (re)patching when the set changed, prompt encoding and the VAE
encode of the init image / inpaint conditioning; ``denoise`` = every sampler step (both hires
passes and the upscale between them); ``decode`` = the final VAE decode.

The hub folder (diffusers layout) is reported ``unsupported``: the original backend reads
the single-file layout only, as A1111 does; the zoo and real releases both ship single files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from backends.base import (
    SDXL_CONTROLNET_UNSUPPORTED,
    TORCH_DTYPES,
    Backend,
    Output,
    Request,
    Session,
    staged_unsupported,
)
from backends.original.attention import set_attention, xformers_available
from backends.original.checkpoint import load_latent_diffusion
from backends.original.controlnet import ActiveControls, ControlledUNet, ControlNet, load_controlnet
from backends.original.denoiser import CFGDenoiser, DiscreteEpsDenoiser, DiscreteVDenoiser
from backends.original.lora import LoraPatcher, layer_names
from backends.original.memory import ModuleSwapper, place
from backends.original.samplers import (
    NOT_IMPLEMENTED,
    SAMPLERS,
    build_sigmas,
    img2img_steps,
    truncate_sigmas,
)
from backends.original.text import GeneralConditioner
from backends.original.workflows import (
    INPAINT_EXTRA_CHANNELS,
    encode,
    image_tensor,
    inpaint_conditioning,
    latent_mask,
    mask_tensor,
    upscale_image,
    upscale_latents,
)
from harness.errors import UnsupportedError, UserError
from harness.vocabulary import split_sampler

if TYPE_CHECKING:
    from harness.matrix import Cell
    from harness.measure import GenerationTimer
    from models.sources import ResolvedModel

SINGLE_FILE_SOURCES: tuple[str, ...] = ("safetensors", "ckpt")
#: Workflows a request may carry (the harness turns outpaint into inpaint on a larger canvas).
WORKFLOWS: tuple[str, ...] = ("txt2img", "img2img", "inpaint", "hires")
_COMPILE_MODES: dict[str, str | None] = {
    "default": None,
    "reduce-overhead": "reduce-overhead",
    "max-autotune": "max-autotune",
}


class OriginalSession(Session):
    """A loaded :class:`~.ldm.LatentDiffusion` under one load key."""

    def __init__(self, cell: Cell, model: ResolvedModel, device: torch.device) -> None:
        self.device = device
        self.channels_last = cell.channels_last
        self.ldm = load_latent_diffusion(
            model.path,
            spec_name=model.spec_name,
            config_dir=model.config_dir,
            dtype=TORCH_DTYPES[cell.dtype],
        )
        if model.prediction is not None:  # declared, or A1111's test on an SD 2.x file
            self.ldm.parameterization = model.prediction
        self.latent_channels = self.ldm.latent_channels
        self.vae_scale_factor = self.ldm.vae_scale_factor
        extra_channels = self.ldm.unet.config.in_channels - self.latent_channels
        if extra_channels not in (0, INPAINT_EXTRA_CHANNELS):
            raise UserError(
                f"{model.path}: UNet input has {self.ldm.unet.config.in_channels} channels; "
                f"the original backend runs {self.latent_channels} (regular) or "
                f"{self.latent_channels + INPAINT_EXTRA_CHANNELS} (inpainting) only"
            )
        #: A 9-channel inpainting UNet: every denoising gets mask + masked-image channels.
        self.inpainting_model = extra_channels == INPAINT_EXTRA_CHANNELS
        set_attention(self.ldm, cell.attention)
        if cell.channels_last:
            self.ldm.to(memory_format=torch.channels_last)
        self.swapper: ModuleSwapper | None = place(self.ldm, device, cell.offload)
        self.lora = LoraPatcher(
            layer_names(self.ldm.unet, [part.encoder for part in self.ldm.text.parts()])
        )
        self._embedding_files: dict[Path, Any] = {}
        #: The trigger words and vectors of the request prepared last.
        self._vectors: dict[str, Any] = {}
        eps_model = self.ldm.unet
        if cell.compile != "none":
            eps_model = torch.compile(
                eps_model, mode=_COMPILE_MODES[cell.compile], fullgraph=cell.fullgraph
            )
        #: The UNet with the running generation's ControlNets (none outside a generation).
        self.controlled = ControlledUNet(eps_model)
        self._controlnets: dict[Path, ControlNet] = {}
        self._dtype = TORCH_DTYPES[cell.dtype]
        denoiser = DiscreteVDenoiser if self.ldm.parameterization == "v" else DiscreteEpsDenoiser
        inner = denoiser(self.controlled, self.ldm.alphas_cumprod).to(device)
        self.denoiser = CFGDenoiser(inner)

    @torch.no_grad()
    def prepare(self, request: Request) -> None:
        """Patch the request's LoRA weights in (a no-op when unchanged) and read its
        embedding files (once per session)."""
        self.lora.apply((ref.path, ref.strength) for ref in request.loras)
        self._vectors = self._embeddings(request)
        for ref in request.controls:
            self._controlnet(ref.path, ref.source)

    def _controlnet(self, path: Path | None, source: Path) -> ControlNet:
        """The ControlNet of a single file, loaded once per session (strictly, in the
        session's dtype; registered with the memory mode's swapper)."""
        if isinstance(self.ldm.text, GeneralConditioner):
            raise UnsupportedError(SDXL_CONTROLNET_UNSUPPORTED)
        if path is None:
            raise UnsupportedError(
                f"controlnet '{source}': a diffusers folder; the original backend reads the "
                "original single file (control_model.*)"
            )
        net = self._controlnets.get(path)
        if net is None:
            net = load_controlnet(path, self.ldm.unet.config, self._dtype, self.device)
            if self.swapper is not None:
                self.swapper.register(net)
            self._controlnets[path] = net
        return net

    def generate(self, request: Request, timer: GenerationTimer) -> Output:
        if request.workflow not in WORKFLOWS:
            raise UnsupportedError(
                f"the original backend runs {', '.join(WORKFLOWS)}, not {request.workflow}"
            )
        base, karras = split_sampler(request.sampler)
        if base in NOT_IMPLEMENTED:
            raise UnsupportedError(NOT_IMPLEMENTED[base])
        text = self.ldm.text
        prompts = [request.prompt] * request.batch
        guided = request.guidance > 1.0
        shape = tuple(request.noise.shape)
        size = (request.height, request.width)  # SDXL's size conditioning

        self.prepare(request)
        embeddings = self._vectors
        with timer.phase("encode"):
            if guided:
                negatives = [request.negative_prompt] * request.batch
                cond, uncond = text.encode_pair(prompts, negatives, embeddings, size=size)
            else:
                cond, uncond = text(prompts, embeddings=embeddings, size=size), None
            start = self._start(request, shape)
            self.controlled.active = self._controls(request, timer)
        conditioning = {"cond": cond, "uncond": uncond, "cond_scale": request.guidance}

        try:
            with timer.phase("denoise"):
                latents = self._denoise(request, request.noise, start, conditioning, timer)
                if request.workflow == "hires":
                    latents = self._hires_pass(request, latents, conditioning, timer)
        finally:
            self.controlled.active = None

        with timer.phase("decode"):
            decoded = self.ldm.decode_first_stage(latents)
            images = ((decoded.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1)
            images_np: np.ndarray = images.cpu().numpy()
        return Output(images=images_np, latents=latents.float().cpu())

    # --- workflow steps ----------------------------------------------------------------------

    def _embeddings(self, request: Request) -> dict[str, Any]:
        """Trigger word -> vectors of the request's embeddings (files read once per session;
        SDXL's a dict of ``clip_l`` / ``clip_g``)."""
        from models import read_embedding

        def as_float(vectors: Any) -> Any:
            if isinstance(vectors, dict):
                return {key: value.float() for key, value in vectors.items()}
            return vectors.float()

        vectors: dict[str, Any] = {}
        for ref in request.embeddings:
            if ref.vectors is not None:
                vectors[ref.token] = as_float(ref.vectors)
            elif ref.path is not None:
                path = Path(ref.path)
                if path not in self._embedding_files:
                    self._embedding_files[path] = as_float(read_embedding(path)[1])
                vectors[ref.token] = self._embedding_files[path]
            else:
                raise ValueError(f"embedding {ref.token!r} has neither a path nor vectors")
        return vectors

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """The init latents of ``image`` as img2img / inpaint compute them, on the CPU."""
        pixels = image_tensor(image, image.shape[1], image.shape[0], self.device)
        return encode(self.ldm, pixels).cpu()

    def _controls(self, request: Request, timer: GenerationTimer) -> ActiveControls | None:
        """The request's ControlNets with their hints (``[batch, 3, H, W]`` on the device),
        timed as the ``controlnet`` part of each step."""
        if not request.controls:
            return None
        hints = [
            (image_tensor(ref.image, request.width, request.height, self.device) + 1.0) / 2.0
            for ref in request.controls
        ]

        def time_part(begin: bool) -> None:
            (timer.begin_part if begin else timer.end_part)("controlnet")

        return ActiveControls(
            nets=[self._controlnet(ref.path, ref.source) for ref in request.controls],
            hints=[hint.expand(request.batch, -1, -1, -1) for hint in hints],
            scales=[ref.scale for ref in request.controls],
            mode=request.control_mode,
            start=request.control_start,
            end=request.control_end,
            timer=time_part,
        )

    def _start(self, request: Request, shape: tuple[int, ...]) -> _Start:
        """What the first denoising starts from: the init latent, strength and masks."""
        if request.workflow in ("txt2img", "hires"):
            return _Start(image_cond=self._dummy_conditioning(shape))
        if request.init_image is None:
            raise UserError(f"{request.workflow} needs an init image; the request has none")
        pixels = image_tensor(request.init_image, request.width, request.height, self.device)
        init = encode(self.ldm, pixels).expand(shape[0], -1, -1, -1)
        if request.workflow == "img2img":
            return _Start(init, request.strength, image_cond=self._dummy_conditioning(shape))
        if request.mask is None:
            raise UserError("inpaint needs a mask; the request has none")
        mask = mask_tensor(request.mask, request.width, request.height, self.device)
        image_cond = None
        if self.inpainting_model:
            image_cond = inpaint_conditioning(self.ldm, shape, pixels, mask, self.device)
        return _Start(init, request.strength, latent_mask(mask, shape[-2:]), image_cond)

    def _dummy_conditioning(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        if not self.inpainting_model:
            return None
        return inpaint_conditioning(self.ldm, shape, None, None, self.device)

    def _denoise(
        self,
        request: Request,
        noise: torch.Tensor,
        start: _Start,
        conditioning: dict[str, Any],
        timer: GenerationTimer,
        seed_offset: int = 0,
    ) -> torch.Tensor:
        """One sampler run: txt2img from ``noise``, or img2img / inpaint from the init latent
        over the last ``int(steps * strength)`` sigmas, ``x = init + noise * sigmas[0]``.
        Ancestral / SDE noise comes from a generator seeded ``request.seed + seed_offset``."""
        base, karras = split_sampler(request.sampler)
        steps = request.steps
        sigmas = build_sigmas(self.denoiser.inner, base, karras, steps)
        noise = noise.to(self.device, torch.float32)
        options: dict[str, Any] = {}
        extra = dict(conditioning, image_cond=start.image_cond)
        if start.init is None:
            x = noise * sigmas[0]
        else:
            sigmas = truncate_sigmas(sigmas, img2img_steps(steps, start.strength))
            if len(sigmas) == 1:  # strength 0: nothing to denoise
                return start.init.clone()
            x = start.init + noise * sigmas[0]
            if base == "ddim":
                options["from_noise"] = False
            if start.mask is not None:
                extra.update(init_latent=start.init, mask=start.mask)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        callback: Any = timer.step
        controls = self.controlled.active
        if controls is not None:
            controls.steps, controls.step = len(sigmas) - 1, 0

            def callback(info: dict[str, Any]) -> None:
                controls.on_step(int(info["i"]))
                timer.step()

        latents = SAMPLERS[base](
            self.denoiser,
            x,
            sigmas,
            extra_args=extra,
            callback=callback,
            generator=torch.Generator().manual_seed(request.seed + seed_offset),
            **options,
        )
        if start.init is not None and start.mask is not None:
            latents = start.init * (1 - start.mask) + start.mask * latents
        return latents

    def _hires_pass(
        self,
        request: Request,
        latents: torch.Tensor,
        conditioning: dict[str, Any],
        timer: GenerationTimer,
    ) -> torch.Tensor:
        """Upscale the first pass and run img2img on it at ``request.strength``."""
        if request.hires_noise is None:
            raise ValueError("a hires request needs hires_noise (the upscaled latent's noise)")
        shape = tuple(request.hires_noise.shape)
        if request.hires_upscaler == "latent":
            upscaled = upscale_latents(latents, shape[-2:])
        elif request.hires_upscaler == "image":
            upscaled = upscale_image(self.ldm, latents, shape[-2:])
        else:
            raise UserError(
                f"hires_upscaler must be 'latent' or 'image', got {request.hires_upscaler!r}"
            )
        start = _Start(upscaled, request.strength, image_cond=self._dummy_conditioning(shape))
        text = self.ldm.text
        if isinstance(text, GeneralConditioner):  # SDXL: the second pass's size, as A1111
            size = (shape[-2] * self.vae_scale_factor, shape[-1] * self.vae_scale_factor)
            conditioning = dict(conditioning)
            for key in ("cond", "uncond"):
                if conditioning[key] is not None:
                    conditioning[key] = text.with_size(conditioning[key], size)
        return self._denoise(request, request.hires_noise, start, conditioning, timer, 1)

    def close(self) -> None:
        self._controlnets.clear()
        self.lora.restore()
        if self.swapper is not None:
            self.swapper.remove()
        self.ldm.to("cpu")
        del self.denoiser, self.ldm
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class _Start:
    """Where a denoising starts: ``init`` None = from noise (txt2img); else img2img from the
    init latent at ``strength``, kept outside ``mask`` (latent grid, 1 = repaint) if given;
    ``image_cond`` is the 9-channel model's ``c_concat``."""

    init: torch.Tensor | None = None
    strength: float = 1.0
    mask: torch.Tensor | None = None
    image_cond: torch.Tensor | None = None


class OriginalBackend(Backend):
    """CompVis/LDM modules with k-diffusion samplers (the A1111 / SD.Next original backend)."""

    name = "original"
    #: Prompts past 75 tokens keep their tail (75-token chunks, :mod:`.text`).
    long_prompts = True
    #: ControlNet (``cldm``) on every workflow but the hires fix (:mod:`.controlnet`).
    controlnet = True

    def unsupported(self, cell: Cell, device: torch.device) -> str | None:
        from models.staged import STAGED_SPECS

        if cell.model in STAGED_SPECS:
            return staged_unsupported(STAGED_SPECS[cell.model].family)
        if cell.source not in SINGLE_FILE_SOURCES:
            return (
                f"the original backend loads single files (safetensors, ckpt); "
                f"source {cell.source!r} is the diffusers folder layout"
            )
        if cell.base_workflow not in (*WORKFLOWS, "outpaint"):
            return f"the original backend has no workflow {cell.workflow!r}"
        base, _karras = split_sampler(cell.sampler)
        if base in NOT_IMPLEMENTED:
            return NOT_IMPLEMENTED[base]
        if cell.offload != "none" and device.type != "cuda":
            return f"offload {cell.offload} needs a CUDA device; none here"
        if cell.attention == "xformers":
            if not xformers_available():
                return "attention xformers: xformers is not installed"
            if device.type != "cuda":
                return "attention xformers needs a CUDA device; none here"
        if cell.compile == "reduce-overhead" and device.type != "cuda":
            return "compile reduce-overhead (CUDA graphs) needs a CUDA device; none here"
        if cell.compile != "none" and cell.offload != "none":
            return (
                f"compile {cell.compile} with offload {cell.offload}: the offload hooks move "
                "weights between devices inside the compiled UNet"
            )
        return None

    def imports(self) -> None:
        import safetensors.torch  # noqa: F401 - the single files
        import scipy.integrate  # noqa: F401 - the lms sampler's coefficients
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401 - the text encoder

    def load(self, cell: Cell, model: ResolvedModel, device: torch.device) -> Session:
        if model.family is not None:  # a multi-stage model by a path or hub id
            raise UnsupportedError(staged_unsupported(model.family))
        reason = self.unsupported(cell, device)
        if reason is not None:
            raise UnsupportedError(reason)
        return OriginalSession(cell, model, device)
