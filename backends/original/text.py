"""CLIP text conditioning as the original backend does it.

:class:`FrozenCLIPEmbedder` is LDM's ``cond_stage_model``: a ``transformers.CLIPTextModel``
under the attribute ``transformer`` (checkpoint keys ``cond_stage_model.transformer.*``) whose
last hidden state is the UNet's cross-attention context.

Long prompts are handled the way A1111's ``sd_hijack_clip.py`` does: the prompt is tokenised
without special tokens or truncation, cut into chunks of 75 tokens, each chunk wrapped in
BOS ... EOS and padded to 77, every chunk encoded separately (batch-wide) and the hidden states
concatenated along the token axis, so a 100-token prompt becomes 2 x 77 = 154 context vectors
and its tail is kept. The negative prompt is padded with empty chunks to the same count, so
cond and uncond stack into one CFG batch. Padding uses the tokenizer's pad token (EOS for the
public SD 1.x tokenizer, as in A1111 and in CompVis' ``padding="max_length"``). Not done here:
A1111's ``(word:1.2)`` emphasis, comma back-tracking at chunk borders and textual inversion.
A prompt of at most 75 tokens gives exactly what diffusers' ``encode_prompt`` gives.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CHUNK_TOKENS = 75  # prompt tokens per chunk; + BOS + EOS = 77 = CLIP's context length


class FrozenCLIPEmbedder(nn.Module):
    """``cond_stage_model``: tokenizer + ``transformer`` (a ``CLIPTextModel``)."""

    def __init__(self, transformer: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.id_start: int = int(tokenizer.bos_token_id)
        self.id_end: int = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.id_pad: int = self.id_end if pad is None else int(pad)

    #: Where token ids go; set when the transformer may sit on the CPU between uses
    #: (medvram / lowvram move it to this device in a forward pre-hook).
    execution_device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        if self.execution_device is not None:
            return self.execution_device
        return next(self.transformer.parameters()).device

    # --- tokens ------------------------------------------------------------------------------

    def tokenize_chunks(self, prompt: str) -> list[list[int]]:
        """The prompt as chunks of 77 token ids (BOS, up to 75 tokens, EOS, padding)."""
        ids: list[int] = self.tokenizer(prompt, truncation=False, add_special_tokens=False)[
            "input_ids"
        ]
        pieces = [ids[i : i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)] or [[]]
        return [self._wrap(piece) for piece in pieces]

    def _wrap(self, piece: list[int]) -> list[int]:
        chunk = [self.id_start, *piece, self.id_end]
        return chunk + [self.id_pad] * (CHUNK_TOKENS + 2 - len(chunk))

    def tokens(self, prompts: list[str], min_chunks: int = 1) -> torch.Tensor:
        """``[len(prompts), chunks * 77]`` ids, every prompt padded with empty chunks to the
        longest prompt's chunk count (at least ``min_chunks``)."""
        chunked = [self.tokenize_chunks(prompt) for prompt in prompts]
        count = max([min_chunks, *(len(chunks) for chunks in chunked)])
        rows = [
            [
                token
                for chunk in chunks + [self._wrap([])] * (count - len(chunks))
                for token in chunk
            ]
            for chunks in chunked
        ]
        return torch.tensor(rows, dtype=torch.long)

    # --- encoding ----------------------------------------------------------------------------

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, chunks * 77]`` ids -> ``[B, chunks * 77, hidden]`` context, chunk by chunk."""
        size = CHUNK_TOKENS + 2
        hidden = [
            self.transformer(input_ids=tokens[:, i : i + size].to(self.device)).last_hidden_state
            for i in range(0, tokens.shape[1], size)
        ]
        return torch.cat(hidden, dim=1)

    def forward(self, prompts: list[str], min_chunks: int = 1) -> torch.Tensor:
        return self.encode_tokens(self.tokens(prompts, min_chunks))

    def encode_pair(
        self, prompts: list[str], negative_prompts: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cond and uncond contexts with the same number of chunks."""
        cond_tokens = self.tokens(prompts)
        uncond_tokens = self.tokens(negative_prompts, min_chunks=cond_tokens.shape[1] // 77)
        if uncond_tokens.shape[1] > cond_tokens.shape[1]:
            cond_tokens = self.tokens(prompts, min_chunks=uncond_tokens.shape[1] // 77)
        return self.encode_tokens(cond_tokens), self.encode_tokens(uncond_tokens)
