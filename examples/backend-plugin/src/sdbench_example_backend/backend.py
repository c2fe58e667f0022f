"""The ``chunked-attention`` backend: diffusers' ``StableDiffusionPipeline`` from a hub-layout
folder, its UNet's attention replaced by :class:`ChunkedAttnProcessor`.

Written against sdbench's adapter API (:mod:`backends.api`) only. What it does not run it says
in :meth:`ChunkedAttentionBackend.unsupported`, so those cells are recorded ``unsupported``
with the reason instead of failing.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np
import torch

from backends.api import (
    TORCH_DTYPES,
    Backend,
    Cell,
    GenerationTimer,
    Output,
    Request,
    ResolvedModel,
    Session,
    UnsupportedError,
)
from sdbench_example_backend.attention import ChunkedAttnProcessor

#: sdbench sampler name -> (diffusers scheduler class, config overrides).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "ddim": ("DDIMScheduler", {}),
}
#: Query positions per attention chunk (``CHUNKED_ATTENTION_SIZE`` overrides it: small test
#: images have fewer positions than one default chunk).
CHUNK_SIZE = int(os.environ.get("CHUNKED_ATTENTION_SIZE", "1024"))


class ChunkedAttentionSession(Session):
    def __init__(self, pipe: Any, dtype: torch.dtype) -> None:
        self.pipe = pipe
        self.dtype = dtype
        # diffusers walks every module on each read of _execution_device: once, not per call
        self.device = pipe._execution_device
        self._scheduler_config = dict(pipe.scheduler.config)
        self._sampler: str | None = None
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.latent_channels = int(pipe.unet.config.in_channels)

    def prepare(self, request: Request) -> None:
        """Untimed: the scheduler of the request's sampler (a no-op when it is already set)."""
        if request.sampler == self._sampler:
            return
        import diffusers

        if request.sampler not in SCHEDULERS:
            raise UnsupportedError(f"sampler {request.sampler}: not offered by this backend")
        class_name, overrides = SCHEDULERS[request.sampler]
        scheduler_class = getattr(diffusers, class_name)
        self.pipe.scheduler = scheduler_class.from_config(self._scheduler_config | overrides)
        self._sampler = request.sampler

    @torch.no_grad()
    def generate(self, request: Request, timer: GenerationTimer) -> Output:
        self.prepare(request)
        pipe = self.pipe
        device = self.device
        cfg = request.guidance > 1.0
        with timer.phase("encode"):
            prompt_embeds, negative_embeds = pipe.encode_prompt(
                request.prompt, device, num_images_per_prompt=request.batch,
                do_classifier_free_guidance=cfg, negative_prompt=request.negative_prompt or None,
            )
        final: dict[str, torch.Tensor] = {}

        def on_step_end(pipeline: Any, index: int, _t: Any, tensors: dict[str, Any]) -> dict:
            timer.step()  # after every denoising step
            if index == pipeline.num_timesteps - 1:  # the last one: the VAE decode follows
                final["latents"] = tensors["latents"].detach().clone()
                timer.end("denoise")
                timer.begin("decode")
            return tensors

        timer.begin("denoise")
        result = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds if cfg else None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            height=request.height,
            width=request.width,
            # the harness's noise: the pipeline scales it by the scheduler's init_noise_sigma
            latents=request.noise.to(device=device, dtype=self.dtype),
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="np",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        timer.end("decode")
        return Output(images=np.asarray(result.images, dtype=np.float32),
                      latents=final["latents"].float())

    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        vae = self.pipe.vae
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1
        posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return posterior.mode() * vae.config.scaling_factor

    def close(self) -> None:
        self.pipe = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class ChunkedAttentionBackend(Backend):
    name = "chunked-attention"
    #: Besides this package's own version (which counts by itself): the library it patches.
    packages: ClassVar[tuple[str, ...]] = ("diffusers",)

    def unsupported(self, cell: Cell, device: torch.device) -> str | None:
        if cell.workflow != "txt2img":
            return f"workflow {cell.workflow}: this backend runs txt2img only"
        if cell.source != "hub":
            return f"source {cell.source}: this backend loads hub-layout folders only"
        if cell.sampler not in SCHEDULERS:
            return f"sampler {cell.sampler}: not offered (only {', '.join(SCHEDULERS)})"
        for axis, plain in (("offload", "none"), ("compile", "none"), ("lora", "none"),
                            ("embedding", "none"), ("channels_last", False)):
            if getattr(cell, axis) != plain:
                return f"{axis} {getattr(cell, axis)}: not offered by this backend"
        return None

    def imports(self) -> None:
        import diffusers

        diffusers.StableDiffusionPipeline  # noqa: B018 - diffusers imports classes on access

    def load(self, cell: Cell, model: ResolvedModel, device: torch.device) -> Session:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging

        logging.disable_progress_bar()
        dtype = TORCH_DTYPES[cell.dtype]
        pipe = StableDiffusionPipeline.from_pretrained(
            str(model.path), dtype=dtype, local_files_only=True, safety_checker=None,
            requires_safety_checker=False,
        )
        pipe.unet.set_attn_processor(ChunkedAttnProcessor(CHUNK_SIZE))  # the user's patch
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        return ChunkedAttentionSession(pipe, dtype)
