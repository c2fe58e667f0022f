"""A user's attention patch: scaled dot-product attention over chunks of the queries.

Each chunk of ``chunk_size`` query positions attends to every key, so the attention matrix
held at once is ``chunk_size × keys`` per head instead of ``queries × keys``; the result equals
unchunked attention up to floating-point rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention


class ChunkedAttnProcessor:
    """A diffusers attention processor (``unet.set_attn_processor(ChunkedAttnProcessor())``)."""

    def __init__(self, chunk_size: int = 256) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.chunk_size = chunk_size

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("ChunkedAttnProcessor: spatial or group norm attention")
        residual = hidden_states
        image_shape = None
        if hidden_states.ndim == 4:  # [batch, channels, height, width] -> [batch, hw, channels]
            image_shape = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        def heads(tensor: torch.Tensor) -> torch.Tensor:  # [b, n, h*d] -> [b, h, n, d]
            split = tensor.view(batch, -1, attn.heads, tensor.shape[-1] // attn.heads)
            return split.transpose(1, 2)

        query = heads(attn.to_q(hidden_states))
        key, value = heads(attn.to_k(context)), heads(attn.to_v(context))
        chunks = []
        for start in range(0, query.shape[2], self.chunk_size):
            stop = start + self.chunk_size
            mask = None if attention_mask is None else attention_mask[:, :, start:stop]
            chunks.append(F.scaled_dot_product_attention(query[:, :, start:stop], key, value,
                                                         attn_mask=mask))
        out = torch.cat(chunks, dim=2).transpose(1, 2).flatten(2)  # [b, n, h*d]
        out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))
        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
