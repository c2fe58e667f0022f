"""The eps-prediction UNet as a denoiser over sigmas (k-diffusion's ``external.py``), with CFG.

SD 1.x is a discrete-time VP model: timestep ``t`` in ``0..999`` has noise level
``sigma(t) = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])``. k-diffusion samples in the
variance-exploding variable ``x = x_vp * sqrt(1 + sigma^2)`` and asks a *denoiser*
``D(x, sigma)`` for the clean latent:

    D(x, sigma) = x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma))

where ``t(sigma)`` inverts ``sigma(t)`` by interpolating ``log sigma`` between the two
neighbouring timesteps (fractional ``t``; :meth:`DiscreteEpsDenoiser.sigma_to_t`).
:class:`CFGDenoiser` runs cond and uncond in one batch and mixes the two denoised latents,
``uncond + guidance * (cond - uncond)``, as A1111's ``CFGDenoiser`` does.

Two workflow hooks ride along in the samplers' ``extra_args``:

- ``image_cond`` (``[B, 5, h, w]``: mask, masked-image latent) is concatenated to the
  UNet's input channels after the ``c_in`` scaling, as LDM's ``DiffusionWrapper`` does with
  ``c_concat`` for the 9-channel inpainting model (``LatentInpaintDiffusion``);
- ``init_latent`` and ``mask`` (``[1 or B, 1, h, w]``, 1 = repaint) blend every denoised
  estimate back to the init latent where the mask keeps it,
  ``denoised = init * (1 - mask) + mask * denoised`` (A1111's latent-masking inpaint).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


class DiscreteEpsDenoiser(nn.Module):
    """k-diffusion's ``CompVisDenoiser``: eps model + discrete schedule -> ``D(x, sigma)``.

    ``eps_model(x_in, t, context)`` is the UNet; ``x`` and the result stay float32 (the
    sampler's precision) while the UNet runs in its own dtype.
    """

    def __init__(self, eps_model: EpsModel, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.eps_model = eps_model
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().to(torch.float32)
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def get_sigmas(self, n: int) -> torch.Tensor:
        """A1111's default ("automatic") schedule: ``n`` sigmas at timesteps evenly spaced from
        the last to 0 (``t`` fractional, log-sigma interpolated), then a final 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n, device=self.sigmas.device)
        return append_zero(self.t_to_sigma(t))

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()

    def get_eps(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        context: torch.Tensor,
        image_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet's noise prediction at noise level ``sigma`` (VE ``x``); ``image_cond``
        (unscaled) is appended to the scaled input's channels."""
        c_in = (1.0 / (sigma**2 + 1.0) ** 0.5)[:, None, None, None]
        x_in = x * c_in
        if image_cond is not None:
            x_in = torch.cat([x_in, image_cond.to(x_in.dtype)], dim=1)
        return self.eps_model(x_in, self.sigma_to_t(sigma), context).float()

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        context: torch.Tensor,
        image_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.denoised(x, sigma, self.get_eps(x, sigma, context, image_cond))

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The clean latent from the UNet's output ``out`` (eps): ``x - sigma eps``."""
        return x - out * sigma[:, None, None, None]


class DiscreteVDenoiser(DiscreteEpsDenoiser):
    """k-diffusion's ``CompVisVDenoiser``: a v-prediction UNet (SD 2.x 768-v) as
    ``D(x, sigma) = x c_skip + v(x c_in, t(sigma)) c_out`` with ``sigma_data = 1``:
    ``c_skip = 1 / (sigma^2 + 1)``, ``c_out = -sigma / sqrt(sigma^2 + 1)``,
    ``c_in = 1 / sqrt(sigma^2 + 1)``."""

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The clean latent from the UNet's output ``out`` (here v)."""
        s = sigma[:, None, None, None]
        return x / (s**2 + 1.0) - out * s / (s**2 + 1.0) ** 0.5


Conditioning = torch.Tensor | dict[str, torch.Tensor]


def cat_conditioning(cond: Conditioning, uncond: Conditioning) -> Conditioning:
    """The CFG batch of two conditionings: contexts, or SDXL's dicts key by key."""
    if isinstance(cond, dict):
        assert isinstance(uncond, dict)
        return {key: torch.cat([cond[key], uncond[key]]) for key in cond}
    assert isinstance(uncond, torch.Tensor)
    return torch.cat([cond, uncond])


class CFGDenoiser(nn.Module):
    """Classifier-free guidance around a denoiser; the samplers call ``model(x, sigma, **extra)``
    with ``extra = {"cond": ..., "uncond": ..., "cond_scale": ...}``.

    With ``cond_scale == 1`` (or no ``uncond``) only the conditional pass runs, as diffusers
    does for ``guidance_scale <= 1``.
    """

    def __init__(self, inner: DiscreteEpsDenoiser) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        cond_scale: float = 1.0,
        image_cond: torch.Tensor | None = None,
        init_latent: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if uncond is None or cond_scale <= 1.0:
            denoised = self.inner(x, sigma, cond, image_cond)
        else:
            x_in = torch.cat([x, x])
            sigma_in = torch.cat([sigma, sigma])
            image_in = None if image_cond is None else torch.cat([image_cond, image_cond])
            both = self.inner(x_in, sigma_in, cat_conditioning(cond, uncond), image_in)
            cond_out, uncond_out = both.chunk(2)
            denoised = uncond_out + (cond_out - uncond_out) * cond_scale
        if mask is not None:
            if init_latent is None:
                raise ValueError("mask needs init_latent (the latent the mask keeps)")
            denoised = init_latent * (1 - mask) + mask * denoised
        return denoised
