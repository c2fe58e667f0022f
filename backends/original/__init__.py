"""The original backend: the CompVis/LDM architecture with k-diffusion style samplers.

Modules, one concept each: :mod:`.unet`, :mod:`.vae`, :mod:`.text` (CLIP conditioning with
75-token chunks), :mod:`.ldm` (the whole model), :mod:`.checkpoint` (single-file loading),
:mod:`.denoiser` (eps model -> denoiser, CFG, inpaint masking), :mod:`.samplers`,
:mod:`.memory` (medvram / lowvram), :mod:`.attention`, :mod:`.workflows` (img2img, inpaint and
hires inputs), :mod:`.lora` (kohya LoRA patching) and :mod:`.backend` (the harness adapter).
"""

from backends.original.backend import OriginalBackend, OriginalSession

__all__ = ["OriginalBackend", "OriginalSession"]
