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
A1111's ``(word:1.2)`` emphasis and comma back-tracking at chunk borders.
A prompt of at most 75 tokens gives exactly what diffusers' ``encode_prompt`` gives.

Textual inversion (A1111's ``EmbeddingsWithFixes``): ``embeddings`` maps a trigger word to
its vectors ``[n, hidden]``. Wherever the trigger word's token ids occur in a prompt, they are
replaced by ``n`` placeholder positions (a new chunk is started first if the ``n`` positions
would not fit in the current one, so an embedding never straddles two chunks), and a forward
hook on CLIP's token-embedding layer overwrites those positions' input embeddings with the
vectors; position embeddings and the transformer then run as usual. Negative prompts use the
same embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harness.errors import UserError

CHUNK_TOKENS = 75  # prompt tokens per chunk; + BOS + EOS = 77 = CLIP's context length
CHUNK_SIZE = CHUNK_TOKENS + 2
#: Token id under an embedding's positions before its vectors replace them (A1111 uses 0).
PLACEHOLDER_ID = 0

#: Trigger word -> vectors ``[n_vectors, hidden]``.
Embeddings = Mapping[str, torch.Tensor]


@dataclass
class PromptChunk:
    """77 token ids (BOS, up to 75 tokens, EOS, padding) and the embeddings placed in them:
    ``(position in the chunk, vectors)``."""

    tokens: list[int]
    fixes: list[tuple[int, torch.Tensor]] = field(default_factory=list)


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
        return [chunk.tokens for chunk in self.prompt_chunks(prompt)]

    def prompt_chunks(self, prompt: str, embeddings: Embeddings | None = None) -> list[PromptChunk]:
        """The prompt cut into 75-token chunks, trigger words replaced by their vectors."""
        ids: list[int] = self.tokenizer(prompt, truncation=False, add_special_tokens=False)[
            "input_ids"
        ]
        triggers = self._triggers(embeddings or {})
        chunks: list[PromptChunk] = []
        piece: list[int] = []
        fixes: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            chunks.append(PromptChunk(self._wrap(piece), list(fixes)))
            piece.clear()
            fixes.clear()

        i = 0
        while i < len(ids):
            found = self._match(triggers, ids, i)
            if found is None:
                piece.append(ids[i])
                i += 1
            else:
                trigger_ids, vectors = found
                if len(piece) + len(vectors) > CHUNK_TOKENS:
                    flush()
                fixes.append((len(piece) + 1, vectors))  # + 1: after BOS
                piece.extend([PLACEHOLDER_ID] * len(vectors))
                i += len(trigger_ids)
            if len(piece) == CHUNK_TOKENS:
                flush()
        if piece or not chunks:
            flush()
        return chunks

    def _triggers(self, embeddings: Embeddings) -> list[tuple[list[int], torch.Tensor]]:
        """(trigger word's token ids, vectors), longest first so a longer trigger wins."""
        hidden = self.transformer.get_input_embeddings().embedding_dim
        triggers = []
        for word, vectors in embeddings.items():
            if vectors.ndim != 2 or vectors.shape[1] != hidden or not 0 < len(vectors) <= 75:
                raise UserError(
                    f"embedding {word!r}: vectors of shape {tuple(vectors.shape)}, expected "
                    f"[n_vectors (1..75), {hidden}] for this text encoder"
                )
            trigger_ids = self.tokenizer(word, truncation=False, add_special_tokens=False)[
                "input_ids"
            ]
            if not trigger_ids:
                raise UserError(f"embedding trigger word {word!r} has no tokens")
            triggers.append((list(trigger_ids), vectors))
        return sorted(triggers, key=lambda item: -len(item[0]))

    @staticmethod
    def _match(
        triggers: list[tuple[list[int], torch.Tensor]], ids: list[int], start: int
    ) -> tuple[list[int], torch.Tensor] | None:
        for trigger_ids, vectors in triggers:
            if ids[start : start + len(trigger_ids)] == trigger_ids:
                return trigger_ids, vectors
        return None

    def _wrap(self, piece: list[int]) -> list[int]:
        chunk = [self.id_start, *piece, self.id_end]
        return chunk + [self.id_pad] * (CHUNK_SIZE - len(chunk))

    def tokens(
        self, prompts: list[str], min_chunks: int = 1, embeddings: Embeddings | None = None
    ) -> torch.Tensor:
        """``[len(prompts), chunks * 77]`` ids, every prompt padded with empty chunks to the
        longest prompt's chunk count (at least ``min_chunks``)."""
        return self.tokens_and_fixes(prompts, min_chunks, embeddings)[0]

    def tokens_and_fixes(
        self, prompts: list[str], min_chunks: int = 1, embeddings: Embeddings | None = None
    ) -> tuple[torch.Tensor, list[list[tuple[int, torch.Tensor]]]]:
        """:meth:`tokens` and, per prompt, the embeddings to place: ``(position in the row,
        vectors)``."""
        chunked = [self.prompt_chunks(prompt, embeddings) for prompt in prompts]
        count = max([min_chunks, *(len(chunks) for chunks in chunked)])
        rows, row_fixes = [], []
        for chunks in chunked:
            padded = chunks + [PromptChunk(self._wrap([]))] * (count - len(chunks))
            rows.append([token for chunk in padded for token in chunk.tokens])
            row_fixes.append(
                [
                    (index * CHUNK_SIZE + position, vectors)
                    for index, chunk in enumerate(padded)
                    for position, vectors in chunk.fixes
                ]
            )
        return torch.tensor(rows, dtype=torch.long), row_fixes

    # --- encoding ----------------------------------------------------------------------------

    def encode_tokens(
        self,
        tokens: torch.Tensor,
        fixes: list[list[tuple[int, torch.Tensor]]] | None = None,
    ) -> torch.Tensor:
        """``[B, chunks * 77]`` ids -> ``[B, chunks * 77, hidden]`` context, chunk by chunk;
        ``fixes`` (per row, from :meth:`tokens_and_fixes`) overwrite input embeddings."""
        hidden = []
        for start in range(0, tokens.shape[1], CHUNK_SIZE):
            chunk_fixes = [
                [
                    (position - start, vectors)
                    for position, vectors in row
                    if start <= position < start + CHUNK_SIZE
                ]
                for row in (fixes or [])
            ]
            with self._injected(chunk_fixes):
                ids = tokens[:, start : start + CHUNK_SIZE].to(self.device)
                hidden.append(self.transformer(input_ids=ids).last_hidden_state)
        return torch.cat(hidden, dim=1)

    @contextmanager
    def _injected(self, fixes: list[list[tuple[int, torch.Tensor]]]) -> Iterator[None]:
        """While active, the token-embedding layer's output carries the embeddings' vectors."""
        if not any(fixes):
            yield
            return

        def replace(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            for row, row_fixes in enumerate(fixes):
                for position, vectors in row_fixes:
                    rows = vectors.to(output.device, output.dtype)
                    output[row, position : position + len(rows)] = rows
            return output

        handle = self.transformer.get_input_embeddings().register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()

    def forward(
        self, prompts: list[str], min_chunks: int = 1, embeddings: Embeddings | None = None
    ) -> torch.Tensor:
        return self.encode_tokens(*self.tokens_and_fixes(prompts, min_chunks, embeddings))

    def encode_pair(
        self,
        prompts: list[str],
        negative_prompts: list[str],
        embeddings: Embeddings | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cond and uncond contexts with the same number of chunks."""
        cond = self.tokens_and_fixes(prompts, 1, embeddings)
        uncond = self.tokens_and_fixes(negative_prompts, cond[0].shape[1] // CHUNK_SIZE, embeddings)
        if uncond[0].shape[1] > cond[0].shape[1]:
            cond = self.tokens_and_fixes(prompts, uncond[0].shape[1] // CHUNK_SIZE, embeddings)
        return self.encode_tokens(*cond), self.encode_tokens(*uncond)
