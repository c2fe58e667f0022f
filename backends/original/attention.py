"""Attention kernels shared by the UNet's transformer blocks and the VAE's attention block.

The original LDM code computes attention as ``softmax(q k^T * scale) v`` with two einsums
(``math`` here). A1111 / SD.Next replace it with
``torch.nn.functional.scaled_dot_product_attention`` (``sdp``) or xformers'
memory-efficient kernel (``xformers``); which one runs is a load-time choice of the scenario
(:data:`ATTENTION_MODES`), set on every module with :func:`set_attention`.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_MODES: tuple[str, ...] = ("sdp", "math", "xformers")


def xformers_available() -> bool:
    """Whether xformers can be imported here (checked without importing it)."""
    return importlib.util.find_spec("xformers") is not None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str) -> torch.Tensor:
    """Multi-head attention over ``[batch, heads, tokens, dim_head]`` tensors."""
    if mode == "sdp":
        return F.scaled_dot_product_attention(q, k, v)
    if mode == "math":
        scale = q.shape[-1] ** -0.5
        weights = torch.einsum("bhid,bhjd->bhij", q, k) * scale
        return torch.einsum("bhij,bhjd->bhid", weights.softmax(dim=-1), v)
    if mode == "xformers":
        import xformers.ops  # only when the scenario asks for it (checked by unsupported())

        # xformers takes [batch, tokens, heads, dim_head].
        out = xformers.ops.memory_efficient_attention(
            q.transpose(1, 2).contiguous(),
            k.transpose(1, 2).contiguous(),
            v.transpose(1, 2).contiguous(),
        )
        return out.transpose(1, 2)
    raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")


def same_layout(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` made contiguous in ``like``'s memory format (channels-last models stay so)."""
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not (
        like.is_contiguous()
    )
    return x.contiguous(memory_format=torch.channels_last if channels_last else
                        torch.contiguous_format)


class AttentionModeMixin:
    """A module whose attention kernel is chosen by :func:`set_attention`."""

    attention_mode: str = "sdp"


def set_attention(model: nn.Module, mode: str) -> None:
    """Select the attention kernel of every attention module inside ``model``."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    for module in model.modules():
        if isinstance(module, AttentionModeMixin):
            module.attention_mode = mode
