"""The whole latent diffusion model: LDM's ``LatentDiffusion`` reduced to what inference needs.

Its ``state_dict()`` keys are the original single-file keys: ``model.diffusion_model.*`` (the
UNet inside LDM's ``DiffusionWrapper``), ``first_stage_model.*`` (the autoencoder) and
``cond_stage_model.transformer.*`` (the CLIP text model of SD 1.x; see :func:`checkpoint_key`
for the ``text_model.`` prefix) or ``cond_stage_model.model.*`` (SD 2.x's OpenCLIP text
tower); SDXL's :class:`DiffusionEngine` has ``conditioner.embedders.0.transformer.*`` (CLIP
ViT-L) and ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG) instead. The DDPM
schedule buffers of the original (``betas``, ``alphas_cumprod``, ...) are not parameters here:
:attr:`LatentDiffusion.alphas_cumprod` is read from the checkpoint when present, else derived
from the linear betas of the config.
"""

from __future__ import annotations

import torch
from torch import nn

from backends.original.text import FrozenCLIPEmbedder
from backends.original.unet import UNetModel
from backends.original.vae import AutoencoderKL


def linear_alphas_cumprod(linear_start: float, linear_end: float, timesteps: int) -> torch.Tensor:
    """LDM's ``make_beta_schedule("linear")``: betas linear in sqrt space, float64, cumprod."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


class DiffusionWrapper(nn.Module):
    """``model``: holds the UNet as ``diffusion_model`` (the original's nesting)."""

    def __init__(self, diffusion_model: UNetModel) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model


class LatentDiffusion(nn.Module):
    """UNet + autoencoder + text conditioning of an SD 1.x / 2.x model, with its noise
    schedule and what its UNet predicts (``parameterization``)."""

    def __init__(
        self,
        unet: UNetModel,
        first_stage: AutoencoderKL,
        cond_stage: FrozenCLIPEmbedder,
        scale_factor: float,
        alphas_cumprod: torch.Tensor,
        parameterization: str = "eps",
    ) -> None:
        super().__init__()
        if parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization must be 'eps' or 'v', got {parameterization!r}")
        #: What the UNet predicts: ``eps`` (SD 1.x, SD 2.x base) or ``v`` (SD 2.x 768-v).
        self.parameterization = parameterization
        self.model = DiffusionWrapper(unet)
        self.first_stage_model = first_stage
        setattr(self, self.text_attribute, cond_stage)
        self.scale_factor = float(scale_factor)
        #: float32, CPU, ``[num_train_timesteps]``; not part of the state dict.
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float32)

    #: Where the text conditioning lives (its checkpoint prefix).
    text_attribute = "cond_stage_model"

    @property
    def text(self) -> FrozenCLIPEmbedder:
        """The text conditioning (SD 1.x / 2.x's ``cond_stage_model``, SDXL's
        ``conditioner``)."""
        module: FrozenCLIPEmbedder = getattr(self, self.text_attribute)
        return module

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def latent_channels(self) -> int:
        return self.first_stage_model.config.embed_dim

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.first_stage_model.config.ch_mult) - 1))

    def encode_first_stage(self, images: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]`` -> diffusion latents (scaled by ``scale_factor``)."""
        return self.first_stage_model.encode(images) * self.scale_factor

    def decode_first_stage(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images, roughly in ``[-1, 1]``."""
        return self.first_stage_model.decode(latents / self.scale_factor)


class DiffusionEngine(LatentDiffusion):
    """SDXL: sgm's ``DiffusionEngine`` reduced to inference, its text conditioning a
    :class:`~.text.GeneralConditioner` under ``conditioner`` (``conditioner.embedders.*``)."""

    text_attribute = "conditioner"
