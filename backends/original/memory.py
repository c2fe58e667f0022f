"""medvram / lowvram: the original backend's way of fitting a model into little GPU memory.

Semantics of A1111's ``lowvram.py``:

- **medvram**: the text encoder (``cond_stage_model.transformer``, SD 2.x's
  ``cond_stage_model.model``; SDXL's whole ``conditioner``, both encoders at once), the UNet
  (``model.diffusion_model``) and the autoencoder (``first_stage_model``) live on the CPU;
  a forward pre-hook on each moves it to the GPU when it is about to run and sends the
  previous occupant back to the CPU, so at most one sub-model is on the GPU at a time.
- **lowvram**: as medvram, but the UNet itself is split: its small parts (``time_embed``,
  ``out``) stay on the GPU and each of ``input_blocks.N``, ``middle_block`` and
  ``output_blocks.N`` is moved to the GPU only for its own forward.

Everything else (the schedule, the denoiser's buffers) lives on the GPU. The autoencoder has
no single ``forward``: its hooks sit on ``encoder`` and ``post_quant_conv`` (the first module
``encode`` / ``decode`` runs) and move the whole ``first_stage_model``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

OFFLOAD_MODES: tuple[str, ...] = ("none", "medvram", "lowvram")


class ModuleSwapper:
    """Keeps at most one registered module on ``device``; the rest wait on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.in_gpu: nn.Module | None = None
        self._parents: dict[nn.Module, nn.Module] = {}
        self._handles: list[Any] = []

    def register(self, trigger: nn.Module, moved: nn.Module | None = None) -> None:
        """Before ``trigger`` runs, move ``moved`` (default: ``trigger``) to the device."""
        self._parents[trigger] = moved if moved is not None else trigger
        self._handles.append(trigger.register_forward_pre_hook(self._send_to_device))
        self._parents[trigger].to("cpu")

    def _send_to_device(self, trigger: nn.Module, _inputs: Any) -> None:
        module = self._parents[trigger]
        if self.in_gpu is module:
            return
        if self.in_gpu is not None:
            self.in_gpu.to("cpu")
        module.to(self.device)
        self.in_gpu = module

    def send_everything_to_cpu(self) -> None:
        if self.in_gpu is not None:
            self.in_gpu.to("cpu")
        self.in_gpu = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.send_everything_to_cpu()


def place(model: Any, device: torch.device, offload: str) -> ModuleSwapper | None:
    """Put a :class:`~.ldm.LatentDiffusion` on ``device`` under the ``offload`` mode."""
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
    parts = model.text.parts()  # SDXL's conditioner: two text encoders
    # SDXL: A1111 swaps the conditioner as one (both encoders run on each prompt, in turn)
    whole_text = len(parts) > 1
    for part in parts:
        part.execution_device = device
    if offload == "none":
        model.to(device)
        return None

    unet = model.model.diffusion_model
    vae = model.first_stage_model
    # Move everything but the swapped parts to the device, as A1111 detaches them first.
    swapped: list[tuple[nn.Module, str]] = [
        (model, "first_stage_model"),
        *([(model, model.text_attribute)] if whole_text
          else [(part, part.encoder_attribute) for part in parts]),
    ]
    if offload == "medvram":
        swapped.append((model.model, "diffusion_model"))
    else:
        swapped += [(unet, "input_blocks"), (unet, "middle_block"), (unet, "output_blocks")]
    held = [(owner, name, getattr(owner, name)) for owner, name in swapped]
    for owner, name, _module in held:
        setattr(owner, name, None)
    model.to(device)
    for owner, name, module in held:
        setattr(owner, name, module)

    swapper = ModuleSwapper(device)
    for part in parts:
        swapper.register(part.encoder, model.text if whole_text else None)
    swapper.register(vae.encoder, vae)
    swapper.register(vae.post_quant_conv, vae)
    if offload == "medvram":
        swapper.register(unet)
    else:
        for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
            swapper.register(block)
    return swapper
