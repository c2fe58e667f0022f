"""ControlNet on the original backend: ``cldm.py``'s architecture, its file and its use.

:class:`ControlNet` has the original parameter names (``time_embed``, ``input_hint_block``,
``input_blocks``, ``zero_convs``, ``middle_block``, ``middle_block_out``), so the
``control_model.*`` tensors of a ControlNet 1.x single file (or the same names without the
prefix, as the ``.pth`` releases store them) load with ``load_state_dict(strict=True)``. Its
forward is ``cldm.ControlNet.forward``: the hint encoder's output is added after the first
input block, and every input block's output and the middle block's go through their zero
convolution — the residuals the UNet adds to its skip connections and middle block
(:meth:`~.unet.UNetModel.forward`'s ``control``).

:class:`ControlledUNet` stands where the UNet stands for the denoiser and applies the nets
of one generation (:class:`ActiveControls`) the way A1111's ControlNet extension does:

- each net's residuals times its scale, summed over the nets (multi-ControlNet);
- **control mode** (the extension's names): ``balanced`` — the control on the conditional
  and the unconditional batch alike; ``prompt`` ("My prompt is more important") — residual
  ``i`` of ``K`` scaled by ``0.825 ** (K - 1 - i)`` (soft injection); ``controlnet``
  ("ControlNet is more important") — soft injection, on the conditional batch only (the
  unconditional one gets no control: ``cldm``'s guess mode);
- **start / end** as step fractions, diffusers' rule: step ``i`` of ``N`` has the control
  iff neither ``i / N < start`` nor ``(i + 1) / N > end``.

Under CFG the denoiser batches ``[cond, uncond]`` (:class:`~.denoiser.CFGDenoiser`): a batch
of twice the request's is that, its first half the conditional one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backends.original.checkpoint import read_checkpoint, read_pickle
from backends.original.unet import (
    TimestepEmbedSequential,
    UNetConfig,
    build_encoder,
    time_embed_mlp,
    timestep_embedding,
)
from harness.errors import UserError

CONTROL_PREFIX = "control_model."
#: Channels of the hint encoder's stages, as ``cldm.py`` hard-codes them.
HINT_CHANNELS: tuple[int, ...] = (16, 32, 96, 256)
#: A1111's soft-injection base (``0.825 ** (12 - i)`` for SD 1.x's 13 residuals).
SOFT_INJECTION = 0.825
CONTROL_MODES: tuple[str, ...] = ("balanced", "prompt", "controlnet")


class ControlNet(nn.Module):
    """``cldm.ControlNet``: ``forward(x, hint, timesteps, context) -> residuals``."""

    def __init__(self, config: UNetConfig, hint_channels: int = 3) -> None:
        super().__init__()
        self.config = config
        mc = config.model_channels
        time_embed_dim = mc * 4
        self.time_embed = time_embed_mlp(mc)
        hint: list[nn.Module] = [nn.Conv2d(hint_channels, HINT_CHANNELS[0], 3, padding=1)]
        for width, wider in zip(HINT_CHANNELS, HINT_CHANNELS[1:], strict=False):
            hint += [nn.SiLU(), nn.Conv2d(width, width, 3, padding=1)]
            hint += [nn.SiLU(), nn.Conv2d(width, wider, 3, padding=1, stride=2)]
        hint += [nn.SiLU(), nn.Conv2d(HINT_CHANNELS[-1], mc, 3, padding=1)]
        self.input_hint_block = TimestepEmbedSequential(*hint)
        self.input_blocks, self.middle_block, skip_channels = build_encoder(
            config, config.in_channels, time_embed_dim
        )
        self.zero_convs = nn.ModuleList(
            TimestepEmbedSequential(nn.Conv2d(ch, ch, 1)) for ch in skip_channels
        )
        ch = skip_channels[-1]
        self.middle_block_out = TimestepEmbedSequential(nn.Conv2d(ch, ch, 1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype  # type: ignore[return-value]

    def forward(
        self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> list[torch.Tensor]:
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(self.dtype)
        emb = self.time_embed(t_emb)
        context = context.to(self.dtype)
        guided_hint: torch.Tensor | None = self.input_hint_block(hint.to(self.dtype), emb, context)
        outs = []
        h = x.to(self.dtype)
        for block, zero_conv in zip(self.input_blocks, self.zero_convs, strict=True):
            h = block(h, emb, context)
            if guided_hint is not None:
                h = h + guided_hint
                guided_hint = None
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs


def read_controlnet_state(path: Path) -> dict[str, torch.Tensor]:
    """A ControlNet file's tensors without the ``control_model.`` prefix (``.safetensors``,
    or a ``.pth`` / ``.ckpt`` read with ``weights_only=True``)."""
    if path.is_dir():
        raise UserError(
            f"controlnet '{path}': a diffusers folder; the original backend reads the original "
            "single file (control_model.*, .safetensors or .pth)"
        )
    if not path.is_file():
        raise UserError(f"controlnet '{path}': no such file")
    try:  # safetensors, or a .pth / .ckpt pickle with weights_only (refused if it needs more)
        if path.suffix.lower() == ".safetensors":
            state, _spec = read_checkpoint(path)
        else:
            state, _spec = read_pickle(path)
    except UserError as error:
        raise UserError(f"controlnet '{path}': {error}") from None
    except Exception as error:  # noqa: BLE001 - safetensors raises its own types
        raise UserError(f"controlnet '{path}': not a readable ControlNet file ({error})") from None
    if any(key.startswith(CONTROL_PREFIX) for key in state):
        state = {
            key[len(CONTROL_PREFIX) :]: value
            for key, value in state.items()
            if key.startswith(CONTROL_PREFIX)
        }
    if "input_hint_block.0.weight" not in state:
        raise UserError(
            f"controlnet '{path}': no input_hint_block.0.weight (control_model.*); "
            "not a ControlNet in the original layout"
        )
    return state


def load_controlnet(
    path: Path, unet_config: UNetConfig, dtype: torch.dtype, device: torch.device
) -> ControlNet:
    """The ControlNet of ``path`` for a UNet of ``unet_config`` (strict: every tensor of the
    file has its parameter and every parameter its tensor, of the same shape)."""
    state = read_controlnet_state(path)
    config = UNetConfig(**{**unet_config.__dict__, "in_channels": 4})
    hint_channels = int(state["input_hint_block.0.weight"].shape[1])
    with torch.device("meta"):
        net = ControlNet(config, hint_channels)
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0:2]
        raise UserError(
            f"controlnet '{path}' does not fit the model's UNet: {' '.join(first)[:400]}"
        ) from None
    return net.to(device=device, dtype=dtype).eval()


@dataclass
class ActiveControls:
    """The ControlNets of one generation and where it is (the step the sampler runs)."""

    nets: Sequence[ControlNet]
    #: One hint per net, ``[batch, 3, H, W]`` in ``[0, 1]`` on the device.
    hints: Sequence[torch.Tensor]
    scales: Sequence[float]
    mode: str = "balanced"
    start: float = 0.0
    end: float = 1.0
    #: Sampler steps of the pass (``len(sigmas) - 1``) and the step being run.
    steps: int = 1
    step: int = 0
    #: Called around each net's forward: ``timer(True)`` before, ``timer(False)`` after.
    timer: Any = None
    batch: int = field(init=False)
    #: (net, rows) -> its hint repeated to a UNet call's rows (the CFG batch), built once.
    _repeated: dict[tuple[int, int], torch.Tensor] = field(
        init=False, default_factory=dict, repr=False
    )

    def __post_init__(self) -> None:
        if self.mode not in CONTROL_MODES:
            raise ValueError(f"control mode must be one of {CONTROL_MODES}, got {self.mode!r}")
        self.batch = int(self.hints[0].shape[0]) if self.hints else 0

    def on_step(self, index: int) -> None:
        self.step = index + 1

    @property
    def applies(self) -> bool:
        i, n = self.step, max(self.steps, 1)
        return not (i / n < self.start or (i + 1) / n > self.end)

    def weights(self, count: int) -> list[float]:
        if self.mode == "balanced":
            return [1.0] * count
        return [SOFT_INJECTION ** float(count - 1 - i) for i in range(count)]

    def _hint(self, index: int, rows: int) -> torch.Tensor:
        hint = self.hints[index]
        if rows == hint.shape[0]:
            return hint
        if (index, rows) not in self._repeated:
            self._repeated[(index, rows)] = torch.cat([hint] * (rows // hint.shape[0]))
        return self._repeated[(index, rows)]

    def residuals(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> list[torch.Tensor] | None:
        """The summed, scaled residuals for a UNet call on ``x``, or None (no control now)."""
        if not self.nets or not self.applies:
            return None
        guided = x.shape[0] == 2 * self.batch  # [cond, uncond] under CFG
        cond_only = self.mode == "controlnet" and guided
        rows = self.batch if cond_only else x.shape[0]
        total: list[torch.Tensor] | None = None
        for index, (net, scale) in enumerate(zip(self.nets, self.scales, strict=True)):
            if self.timer is not None:
                self.timer(True)
            hint_in = self._hint(index, rows)
            latents = x[:rows, : net.config.in_channels]  # not a 9-channel UNet's extra inputs
            outs = net(latents, hint_in, timesteps[:rows], context[:rows])
            if self.timer is not None:
                self.timer(False)
            weights = self.weights(len(outs))
            scaled = [out * (scale * w) for out, w in zip(outs, weights, strict=True)]
            total = scaled if total is None else [a + b for a, b in zip(total, scaled, strict=True)]
        assert total is not None
        if cond_only:
            total = [torch.cat([r, torch.zeros_like(r)]) for r in total]
        return total


class ControlledUNet(nn.Module):
    """The UNet with the ControlNets of the running generation (:attr:`active`) applied."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.active: ActiveControls | None = None

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        control = None if self.active is None else self.active.residuals(x, timesteps, context)
        if control is None:
            return self.unet(x, timesteps, context)
        return self.unet(x, timesteps, context, control)
