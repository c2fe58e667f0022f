"""The image inputs of img2img, inpaint and hires fix on the original backend (A1111's
``processing.py``), as tensors the samplers and the denoiser take.

- **img2img**: the init image (``[0, 1]``) goes to ``[-1, 1]`` and through the VAE encoder;
  the posterior's mode (mean) times the scale factor is the init latent (deterministic, as the
  diffusers backend does it). The sampler runs the last ``int(steps * strength)`` sigmas of
  the full schedule from ``init + noise * sigmas[0]``.
- **inpaint, 4-channel model** (latent masking): the mask is area-averaged down to the latent
  grid and rounded (A1111 resizes and rounds ``latmask``); the denoiser blends every denoised
  estimate with the init latent outside the mask and the final latent is blended once more,
  ``x = init * (1 - m) + m * x``, so the kept area's latents are exactly the init latents.
- **9-channel inpainting model** (``LatentInpaintDiffusion``): besides the blending, the UNet
  receives ``c_concat = [mask (1 ch), masked-image latent (4 ch)]`` after its 4 latent
  channels, diffusers' order ``cat([latents, mask, masked_image_latents])``. The mask is
  rounded at full resolution and taken down to the latent grid by nearest neighbour; the
  masked image is ``image * (1 - mask)`` in ``[-1, 1]`` (A1111's ``inpainting_mask_weight``
  = 1), encoded with the mode. Without a mask (txt2img, img2img, hires on such a model) the
  mask is all ones and the masked image all zeros: A1111's dummy conditioning.
- **hires fix**: ``latent`` upscales the first pass's latents with bilinear interpolation
  (A1111's "Latent" upscaler, no antialiasing); ``image`` decodes, resizes with PIL's LANCZOS
  on 8-bit RGB (what A1111's image upscalers receive) and encodes with the mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from harness.errors import UserError

if TYPE_CHECKING:
    from backends.original.ldm import LatentDiffusion

#: Channels the 9-channel inpainting UNet takes on top of the latents: mask + masked image.
INPAINT_EXTRA_CHANNELS = 5


def image_tensor(image: np.ndarray, width: int, height: int, device: torch.device) -> torch.Tensor:
    """``[H, W, 3]`` in ``[0, 1]`` -> ``[1, 3, H, W]`` in ``[-1, 1]``, float32 on ``device``."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise UserError(f"init image must be [height, width, 3], got shape {image.shape}")
    if image.shape[:2] != (height, width):
        raise UserError(
            f"init image is {image.shape[1]}x{image.shape[0]} px, the request {width}x{height} px"
        )
    pixels = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    return (pixels.permute(2, 0, 1)[None] * 2.0 - 1.0).to(device)


def mask_tensor(mask: np.ndarray, width: int, height: int, device: torch.device) -> torch.Tensor:
    """``[H, W]`` in ``[0, 1]`` (1 = repaint) -> ``[1, 1, H, W]`` float32 on ``device``."""
    if mask.shape != (height, width):
        shape = "x".join(str(n) for n in reversed(mask.shape))
        raise UserError(f"inpaint mask is {shape} px, the image {width}x{height} px")
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None].to(device)


def encode(ldm: LatentDiffusion, pixels: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` pixels -> diffusion latents (posterior mode x scale factor), float32."""
    return ldm.encode_first_stage(pixels).float()


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The blending mask on the latent grid: area average, rounded to 0 / 1."""
    return F.interpolate(mask, size=latent_hw, mode="area").round()


def inpaint_conditioning(
    ldm: LatentDiffusion,
    latent_shape: tuple[int, ...],
    pixels: torch.Tensor | None,
    mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """``c_concat`` of the 9-channel model, ``[B, 5, h, w]``: latent-grid mask, masked-image
    latent. ``pixels`` or ``mask`` None: the all-repaint dummy (everything masked, no image)."""
    batch, _channels, h, w = latent_shape
    f = ldm.vae_scale_factor
    if mask is None or pixels is None:
        full_mask = torch.ones(1, 1, h * f, w * f, device=device)
        masked = torch.zeros(1, 3, h * f, w * f, device=device)
    else:
        full_mask = mask.round()
        masked = pixels * (1.0 - full_mask)
    masked_latent = encode(ldm, masked)
    small_mask = F.interpolate(full_mask, size=(h, w), mode="nearest")
    return torch.cat([small_mask, masked_latent], dim=1).expand(batch, -1, -1, -1)


def upscale_latents(latents: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A1111's "Latent" hires upscaler: bilinear, no antialiasing, no corner alignment."""
    return F.interpolate(latents, size=latent_hw, mode="bilinear", align_corners=False)


def upscale_image(
    ldm: LatentDiffusion, latents: torch.Tensor, latent_hw: tuple[int, int]
) -> torch.Tensor:
    """Decode, resize the 8-bit RGB images with LANCZOS, encode with the mode."""
    from PIL import Image

    f = ldm.vae_scale_factor
    size = (latent_hw[1] * f, latent_hw[0] * f)  # PIL: (width, height)
    decoded = ((ldm.decode_first_stage(latents).float() + 1.0) / 2.0).clamp(0.0, 1.0)
    images = (decoded.permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    lanczos = Image.Resampling.LANCZOS
    resized = np.stack([np.asarray(Image.fromarray(im).resize(size, lanczos)) for im in images])
    pixels = torch.from_numpy(resized.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return encode(ldm, (pixels * 2.0 - 1.0).to(latents.device))
