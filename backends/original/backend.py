"""The original backend: LDM modules, k-diffusion samplers, A1111 memory modes.

:class:`OriginalBackend` loads an original single file (``.safetensors`` / ``.ckpt``) into a
:class:`~.ldm.LatentDiffusion` and returns an :class:`OriginalSession`, which generates
txt2img the way the original A1111 / SD.Next backend does: chunked CLIP conditioning, a
k-diffusion sampler over the discrete schedule (CFG inside the denoiser), VAE decode.

The hub folder (diffusers layout) is reported ``unsupported``: the original backend reads
the single-file layout only, as A1111 does; the zoo and real releases both ship single files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from backends.base import TORCH_DTYPES, Backend, Output, Request, Session
from backends.original.attention import set_attention, xformers_available
from backends.original.checkpoint import load_latent_diffusion
from backends.original.denoiser import CFGDenoiser, DiscreteEpsDenoiser
from backends.original.memory import ModuleSwapper, place
from backends.original.samplers import NOT_IMPLEMENTED, SAMPLERS, build_sigmas
from harness.errors import UnsupportedError
from harness.vocabulary import split_sampler

if TYPE_CHECKING:
    from harness.matrix import Cell
    from harness.measure import GenerationTimer
    from models.sources import ResolvedModel

SINGLE_FILE_SOURCES: tuple[str, ...] = ("safetensors", "ckpt")
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
        self.latent_channels = self.ldm.latent_channels
        self.vae_scale_factor = self.ldm.vae_scale_factor
        set_attention(self.ldm, cell.attention)
        if cell.channels_last:
            self.ldm.to(memory_format=torch.channels_last)
        self.swapper: ModuleSwapper | None = place(self.ldm, device, cell.offload)
        eps_model = self.ldm.unet
        if cell.compile != "none":
            eps_model = torch.compile(
                eps_model, mode=_COMPILE_MODES[cell.compile], fullgraph=cell.fullgraph
            )
        inner = DiscreteEpsDenoiser(eps_model, self.ldm.alphas_cumprod).to(device)
        self.denoiser = CFGDenoiser(inner)

    @torch.no_grad()
    def generate(self, request: Request, timer: GenerationTimer) -> Output:
        if request.workflow != "txt2img":
            raise UnsupportedError(
                f"the original backend runs txt2img only, not {request.workflow}"
            )
        base, karras = split_sampler(request.sampler)
        if base in NOT_IMPLEMENTED:
            raise UnsupportedError(NOT_IMPLEMENTED[base])
        text = self.ldm.cond_stage_model
        prompts = [request.prompt] * request.batch
        guided = request.guidance > 1.0

        with timer.phase("encode"):
            if guided:
                negatives = [request.negative_prompt] * request.batch
                cond, uncond = text.encode_pair(prompts, negatives)
            else:
                cond, uncond = text(prompts), None

        with timer.phase("denoise"):
            sigmas = build_sigmas(self.denoiser.inner, base, karras, request.steps)
            x = request.noise.to(self.device, torch.float32) * sigmas[0]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            latents = SAMPLERS[base](
                self.denoiser,
                x,
                sigmas,
                extra_args={"cond": cond, "uncond": uncond, "cond_scale": request.guidance},
                callback=timer.step,
                generator=torch.Generator().manual_seed(request.seed),
            )

        with timer.phase("decode"):
            decoded = self.ldm.decode_first_stage(latents)
            images = ((decoded.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1)
            images_np: np.ndarray = images.cpu().numpy()
        return Output(images=images_np, latents=latents.float().cpu())

    def close(self) -> None:
        if self.swapper is not None:
            self.swapper.remove()
        self.ldm.to("cpu")
        del self.denoiser, self.ldm
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class OriginalBackend(Backend):
    """CompVis/LDM modules with k-diffusion samplers (the A1111 / SD.Next original backend)."""

    name = "original"
    #: Prompts past 75 tokens keep their tail (75-token chunks, :mod:`.text`).
    long_prompts = True

    def unsupported(self, cell: Cell, device: torch.device) -> str | None:
        if cell.source not in SINGLE_FILE_SOURCES:
            return (
                f"the original backend loads single files (safetensors, ckpt); "
                f"source {cell.source!r} is the diffusers folder layout"
            )
        if cell.workflow != "txt2img":
            return f"the original backend runs txt2img only, not {cell.workflow}"
        for feature in ("lora", "embedding"):
            if getattr(cell, feature, "none") != "none":
                return f"{feature} is not implemented in the original backend yet"
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

    def load(self, cell: Cell, model: ResolvedModel, device: torch.device) -> Session:
        reason = self.unsupported(cell, device)
        if reason is not None:
            raise UnsupportedError(reason)
        return OriginalSession(cell, model, device)
