"""The KL-f8 autoencoder as CompVis/LDM defines it (``diffusionmodules/model.py`` +
``models/autoencoder.py``).

Module names follow the original code, so the ``first_stage_model.*`` tensors of an original
single file load with ``load_state_dict(strict=True)``: ``encoder`` / ``decoder`` (``conv_in``,
``down.N.block.M`` / ``up.N.block.M`` :class:`ResnetBlock` s, ``down.N.downsample`` /
``up.N.upsample``, ``mid.block_1``, ``mid.attn_1``, ``mid.block_2``, ``norm_out``,
``conv_out``), ``quant_conv`` and ``post_quant_conv``. The training loss (``lossconfig``)
has no weights in inference checkpoints and is left out.

Latents leave :meth:`AutoencoderKL.encode` and enter :meth:`AutoencoderKL.decode` in the
autoencoder's own scale; the diffusion model's latents are these times ``scale_factor``
(0.18215 for SD 1.x), applied by the caller as LDM's ``decode_first_stage`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backends.original.attention import AttentionModeMixin, attention, same_layout


@dataclass(frozen=True)
class AutoencoderConfig:
    """``first_stage_config.params.ddconfig`` (+ ``embed_dim``) of ``v1-inference.yaml``."""

    embed_dim: int = 4
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    double_z: bool = True

    @classmethod
    def from_ldm(cls, params: dict[str, Any]) -> AutoencoderConfig:
        """From :meth:`models.specs.ModelSpec.ldm_config` ``["first_stage"]``."""
        return cls(
            embed_dim=int(params["embed_dim"]),
            z_channels=int(params["z_channels"]),
            resolution=int(params["resolution"]),
            in_channels=int(params["in_channels"]),
            out_ch=int(params["out_ch"]),
            ch=int(params["ch"]),
            ch_mult=tuple(params["ch_mult"]),
            num_res_blocks=int(params["num_res_blocks"]),
            attn_resolutions=tuple(params.get("attn_resolutions", ())),
            double_z=bool(params.get("double_z", True)),
        )


def Normalize(channels: int) -> nn.GroupNorm:  # noqa: N802 - the original's name
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Two 3x3 convolutions with a residual (1x1 ``nin_shortcut`` when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(AttentionModeMixin, nn.Module):
    """Single-head self-attention over the pixels, with 1x1 convolutions as projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # b c h w -> b 1 (h w) c
            return t.reshape(batch, 1, channels, height * width).transpose(2, 3)

        out = attention(
            tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)), self.attention_mode
        )
        out = same_layout(out.transpose(2, 3).reshape(batch, channels, height, width), x)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding one pixel right and bottom (no symmetric pad)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour 2x up-sampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    """``mid``: ResnetBlock, attention, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block``, ``attn`` and an optional ``downsample``/``upsample``.

    The original builds these as bare ``nn.Module()`` with attributes; a class says the same.
    """

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class Encoder(nn.Module):
    """Image -> moments (mean and log-variance stacked when ``double_z``)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch, levels = config.ch, len(config.ch_mult)
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        resolution = config.resolution
        in_mult = (1, *config.ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(levels):
            level = Level()
            block_in, block_out = ch * in_mult[i_level], ch * config.ch_mult[i_level]
            for _ in range(config.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != levels - 1:
                level.downsample = Downsample(block_in)
                resolution //= 2
            self.down.append(level)
        self.mid = Mid(block_in)
        self.norm_out = Normalize(block_in)
        z_out = 2 * config.z_channels if config.double_z else config.z_channels
        self.conv_out = nn.Conv2d(block_in, z_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image in ``[-1, 1]`` (roughly; not clamped)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch, levels = config.ch, len(config.ch_mult)
        block_in = ch * config.ch_mult[-1]
        resolution = config.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = Mid(block_in)
        ups: list[Level] = []
        for i_level in reversed(range(levels)):
            level = Level()
            block_out = ch * config.ch_mult[i_level]
            for _ in range(config.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != 0:
                level.upsample = Upsample(block_in)
                resolution *= 2
            ups.insert(0, level)  # the original keeps ``up`` in resolution order
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The first stage: ``encode`` to the posterior's moments, ``decode`` from a latent."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in ``[-1, 1]`` -> the posterior's mode (mean), unscaled."""
        moments = self.quant_conv(self.encoder(x.to(self.dtype)))
        mean, _logvar = moments.chunk(2, dim=1)
        return mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> image, roughly in ``[-1, 1]``."""
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))
