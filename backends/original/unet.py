"""The SD 1.x denoising UNet as CompVis/LDM defines it (``openaimodel.py`` + ``attention.py``).

Module names and nesting follow the original code exactly, so the ``model.diffusion_model.*``
tensors of an original single file load with ``load_state_dict(strict=True)``:

- ``time_embed.{0,2}``: the sinusoidal timestep embedding's MLP;
- ``input_blocks.N`` / ``middle_block`` / ``output_blocks.N``: sequences of
  :class:`ResBlock` (``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``),
  :class:`SpatialTransformer` (``norm``, ``proj_in``, ``transformer_blocks``, ``proj_out``),
  :class:`Downsample` (``op``) and :class:`Upsample` (``conv``);
- ``out.{0,2}``: the final GroupNorm and convolution.

Only what SD 1.x uses is kept: 2-D convolutions, no scale-shift norm, no up/down-sampling
ResBlocks, no gradient checkpointing, ``use_linear_in_transformer`` as an option (SD 2.x).
The encoder half (:func:`build_encoder`) is shared with the ControlNet (:mod:`.controlnet`).
Unlike the original, output layers are not zero-initialised: weights always come from a file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backends.original.attention import AttentionModeMixin, attention, same_layout


@dataclass(frozen=True)
class UNetConfig:
    """The ``unet_config.params`` of ``v1-inference.yaml`` that shape the weights."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8
    #: SD 2.x: heads of this many channels at every level (``num_heads`` is then -1).
    num_head_channels: int = -1
    #: Transformer blocks per attention layer: one number, or one per level (SDXL's sgm).
    transformer_depth: int | tuple[int, ...] = 1
    #: The middle block's (sgm's ``transformer_depth_middle``; default: the last level's).
    transformer_depth_middle: int | None = None
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    #: SDXL: width of the ``y`` vector (pooled text + size embeddings) that ``label_emb``
    #: adds to the timestep embedding (sgm's ``num_classes="sequential"``); 0 = none.
    adm_in_channels: int = 0

    def depth(self, level: int | None) -> int:
        """Transformer blocks at ``level`` (None: the middle block)."""
        depths = self.transformer_depth
        if isinstance(depths, int):
            return depths
        if level is None and self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        return depths[-1 if level is None else level]

    @classmethod
    def from_ldm(cls, params: dict[str, Any]) -> UNetConfig:
        """From :meth:`models.specs.ModelSpec.ldm_config` ``["unet"]`` (extra keys ignored)."""
        return cls(
            in_channels=int(params["in_channels"]),
            out_channels=int(params["out_channels"]),
            model_channels=int(params["model_channels"]),
            attention_resolutions=tuple(params["attention_resolutions"]),
            num_res_blocks=int(params["num_res_blocks"]),
            channel_mult=tuple(params["channel_mult"]),
            num_heads=int(params["num_heads"]),
            num_head_channels=int(params.get("num_head_channels", -1)),
            transformer_depth=(
                depth if isinstance(depth := params.get("transformer_depth", 1), int)
                else tuple(int(d) for d in depth)
            ),
            transformer_depth_middle=(
                None if params.get("transformer_depth_middle") is None
                else int(params["transformer_depth_middle"])
            ),
            context_dim=int(params["context_dim"]),
            use_linear_in_transformer=bool(params.get("use_linear_in_transformer", False)),
            adm_in_channels=int(params.get("adm_in_channels", 0)),
        )


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` of (possibly fractional) timesteps."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / half
    freqs = torch.exp(exponent).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the weights' dtype (``normalization()``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


# --- building blocks (attention.py) --------------------------------------------------------


class CrossAttention(AttentionModeMixin, nn.Module):
    """Multi-head attention; self-attention when no ``context`` is given."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        batch, tokens, _ = x.shape

        def heads_first(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        q, k, v = (
            heads_first(self.to_q(x)),
            heads_first(self.to_k(context)),
            heads_first(self.to_v(context)),
        )
        out = attention(q, k, v, self.attention_mode)
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, -1))


class GEGLU(nn.Module):
    """A linear layer producing a value and a GELU gate."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """``net.0`` = GEGLU (gated_ff), ``net.2`` = output projection."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(0.0), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention on the text, feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on the text context."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        use_linear: bool,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6, affine=True)
        self.proj_in: nn.Module = (
            nn.Linear(channels, inner_dim) if use_linear else nn.Conv2d(channels, inner_dim, 1)
        )
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out: nn.Module = (
            nn.Linear(inner_dim, channels) if use_linear else nn.Conv2d(inner_dim, channels, 1)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        # b c h w -> b (h w) c, made contiguous as the original's rearrange(...).contiguous():
        # a transposed view would carry a channels-last layout into the convolutions after the
        # block, which then copy their weights to match it on every call.
        x = x.flatten(2).transpose(1, 2).contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        if self.use_linear:
            x = self.proj_out(x)
        x = same_layout(x.transpose(1, 2).reshape(batch, -1, height, width), residual)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual


# --- building blocks (openaimodel.py) ------------------------------------------------------


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the timestep embedding added in between."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x up-sampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence that hands the timestep embedding to ResBlocks and the text to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# --- the model -----------------------------------------------------------------------------


def _transformer(config: UNetConfig, ch: int, level: int | None) -> SpatialTransformer:
    """The attention layer at ``level`` (None: the middle block)."""
    heads = config.num_heads if config.num_head_channels == -1 else ch // config.num_head_channels
    return SpatialTransformer(
        ch,
        heads,
        ch // heads,
        config.depth(level),
        config.context_dim,
        config.use_linear_in_transformer,
    )


def time_embed_mlp(channels: int) -> nn.Sequential:
    """``time_embed``: the timestep embedding's MLP, ``channels`` -> ``4 x channels``."""
    return nn.Sequential(
        nn.Linear(channels, 4 * channels), nn.SiLU(), nn.Linear(4 * channels, 4 * channels)
    )


def build_encoder(
    config: UNetConfig, in_channels: int, time_embed_dim: int
) -> tuple[nn.ModuleList, TimestepEmbedSequential, list[int]]:
    """``input_blocks`` and ``middle_block`` of ``openaimodel.py`` (shared by the UNet and the
    ControlNet of ``cldm.py``), and the channels of each input block's output (the skips)."""
    mc = config.model_channels
    input_blocks = nn.ModuleList(
        [TimestepEmbedSequential(nn.Conv2d(in_channels, mc, 3, padding=1))]
    )
    skip_channels = [mc]
    ch, ds = mc, 1
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, time_embed_dim, mult * mc)]
            ch = mult * mc
            if ds in config.attention_resolutions:
                layers.append(_transformer(config, ch, level))
            input_blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(config.channel_mult) - 1:
            input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
            ds *= 2
    middle_block = TimestepEmbedSequential(
        ResBlock(ch, time_embed_dim, ch),
        _transformer(config, ch, None),
        ResBlock(ch, time_embed_dim, ch),
    )
    return input_blocks, middle_block, skip_channels


class UNetModel(nn.Module):
    """The eps-prediction UNet: ``forward(x, timesteps, context, control) -> eps``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        mc = config.model_channels
        time_embed_dim = mc * 4
        self.time_embed = time_embed_mlp(mc)
        if config.adm_in_channels:  # sgm's label_emb for num_classes="sequential"
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(config.adm_in_channels, time_embed_dim),
                    nn.SiLU(),
                    nn.Linear(time_embed_dim, time_embed_dim),
                )
            )
        self.input_blocks, self.middle_block, skip_channels = build_encoder(
            config, config.in_channels, time_embed_dim
        )
        ch = skip_channels[-1]
        ds = 2 ** (len(config.channel_mult) - 1)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers: list[nn.Module] = [
                    ResBlock(ch + skip_channels.pop(), time_embed_dim, mc * mult)
                ]
                ch = mc * mult
                if ds in config.attention_resolutions:
                    layers.append(_transformer(config, ch, level))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), nn.Conv2d(mc, config.out_channels, 3, padding=1)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | dict[str, torch.Tensor],
        control: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``context``: the cross-attention context, or SDXL's conditioning dict
        (``crossattn`` and the ``vector`` that ``label_emb`` embeds, as sgm's
        ``OpenAIWrapper`` unpacks it). ``control``: a ControlNet's residuals (``cldm``'s
        ``ControlledUnetModel``), one per input block then the middle block's, added to the
        middle block's output and to each skip connection as the output blocks take it."""
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(self.dtype)
        emb = self.time_embed(t_emb)
        if isinstance(context, dict):
            emb = emb + self.label_emb(context["vector"].to(self.dtype))
            context = context["crossattn"]
        context = context.to(self.dtype)
        h = x.to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        residuals = None if control is None else list(control)
        if residuals is not None:
            h = h + residuals.pop().to(h.dtype)
        for block in self.output_blocks:
            skip = skips.pop()
            if residuals is not None:
                skip = skip + residuals.pop().to(skip.dtype)
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h).to(x.dtype)
