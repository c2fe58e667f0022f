"""CLIP text conditioning as the original backend does it.

:class:`FrozenCLIPEmbedder` is LDM's ``cond_stage_model`` of SD 1.x: a
``transformers.CLIPTextModel`` under the attribute ``transformer`` (checkpoint keys
``cond_stage_model.transformer.*``) whose last hidden state is the UNet's cross-attention
context. :class:`FrozenOpenCLIPEmbedder` is SD 2.x's (``ldm/modules/encoders/modules.py``):
OpenCLIP's text tower under ``model`` with OpenCLIP's own parameter names
(``cond_stage_model.model.token_embedding``, ``positional_embedding``,
``transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.out_proj, ln_2, mlp.c_fc,
mlp.c_proj}``, ``ln_final``, ``text_projection``, ``logit_scale``), run to its penultimate
resblock and through ``ln_final`` (``layer="penultimate"``). Both share the chunking below
(A1111's ``FrozenOpenCLIPEmbedderWithCustomWords`` chunks as its CLIP twin does).

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

    def __init__(
        self, transformer: nn.Module, tokenizer: Any, layer_idx: int | None = None
    ) -> None:
        super().__init__()
        self.transformer = transformer
        #: None: the last hidden state (through the final layer norm, SD 1.x); else the
        #: hidden state after this many layers, unnormalised (sgm's ``layer="hidden"``, SDXL).
        self.layer_idx = layer_idx
        self._use_tokenizer(tokenizer)

    def _use_tokenizer(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.id_start: int = int(tokenizer.bos_token_id)
        self.id_end: int = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.id_pad: int = self.id_end if pad is None else int(pad)

    #: Where token ids go; set when the transformer may sit on the CPU between uses
    #: (medvram / lowvram move it to this device in a forward pre-hook).
    execution_device: torch.device | None = None

    #: The attribute that holds the text model (its checkpoint prefix).
    encoder_attribute = "transformer"

    @property
    def encoder(self) -> nn.Module:
        """The text model itself (what medvram swaps and LoRAs patch)."""
        module: nn.Module = getattr(self, self.encoder_attribute)
        return module

    def token_embedding(self) -> nn.Embedding:
        """The layer whose output textual inversion overwrites."""
        embedding: nn.Embedding = self.transformer.get_input_embeddings()
        return embedding

    def encode_chunk(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, 77]`` ids -> ``[B, 77, hidden]``: the context of one chunk."""
        if self.layer_idx is None:
            return self.transformer(input_ids=ids).last_hidden_state
        output = self.transformer(input_ids=ids, output_hidden_states=True)
        return output.hidden_states[self.layer_idx]

    def parts(self) -> list[FrozenCLIPEmbedder]:
        """The text encoders of this conditioning (SDXL's conditioner has two)."""
        return [self]

    @property
    def device(self) -> torch.device:
        if self.execution_device is not None:
            return self.execution_device
        return next(self.encoder.parameters()).device

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
        hidden = self.token_embedding().embedding_dim
        triggers = []
        for word, vectors in embeddings.items():
            if isinstance(vectors, Mapping):
                raise UserError(
                    f"embedding {word!r}: an SDXL embedding ({', '.join(vectors)}) on a model "
                    "with one text encoder"
                )
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
        return torch.cat(self._encode_chunks(tokens, fixes), dim=1)

    def _encode_chunks(
        self, tokens: torch.Tensor, fixes: list[list[tuple[int, torch.Tensor]]] | None
    ) -> list[Any]:
        """:meth:`encode_chunk` of each chunk of ``tokens``, its embeddings placed."""
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
                hidden.append(self.encode_chunk(ids))
        return hidden

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

        handle = self.token_embedding().register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()

    def chunk_count(self, prompts: list[str], embeddings: Embeddings | None = None) -> int:
        """The chunks of the longest of ``prompts``."""
        return max(len(self.prompt_chunks(prompt, embeddings)) for prompt in prompts)

    def forward(
        self,
        prompts: list[str],
        min_chunks: int = 1,
        embeddings: Embeddings | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The context of ``prompts`` (``size``: SDXL's conditioner's; unused here)."""
        return self.encode_tokens(*self.tokens_and_fixes(prompts, min_chunks, embeddings))

    def encode_pair(
        self,
        prompts: list[str],
        negative_prompts: list[str],
        embeddings: Embeddings | None = None,
        size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cond and uncond contexts with the same number of chunks."""
        cond = self.tokens_and_fixes(prompts, 1, embeddings)
        uncond = self.tokens_and_fixes(negative_prompts, cond[0].shape[1] // CHUNK_SIZE, embeddings)
        if uncond[0].shape[1] > cond[0].shape[1]:
            cond = self.tokens_and_fixes(prompts, uncond[0].shape[1] // CHUNK_SIZE, embeddings)
        return self.encode_tokens(*cond), self.encode_tokens(*uncond)


# --- SD 2.x: OpenCLIP's text tower ----------------------------------------------------------


class ResidualAttentionBlock(nn.Module):
    """OpenCLIP's transformer block: pre-norm multi-head attention and a GELU MLP."""

    def __init__(self, width: int, heads: int, inner: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, inner))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(inner, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, inner: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, inner) for _ in range(layers)
        )


class OpenCLIPText(nn.Module):
    """The text half of an OpenCLIP model, with its parameter names."""

    def __init__(
        self,
        vocab_size: int,
        width: int,
        layers: int,
        heads: int,
        inner: int,
        context: int,
        projection: int | None = None,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context, width))
        self.transformer = OpenCLIPTransformer(width, layers, heads, inner)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, projection or width))
        self.logit_scale = nn.Parameter(torch.empty(()))

    def hidden_states(self, ids: torch.Tensor, layers: int) -> list[torch.Tensor]:
        """The states after each of the first ``layers`` resblocks."""
        x = self.token_embedding(ids) + self.positional_embedding.to(self.token_embedding.weight)
        length = ids.shape[1]
        mask = torch.full((length, length), float("-inf"), device=x.device).triu(1).to(x.dtype)
        states = []
        for block in list(self.transformer.resblocks)[:layers]:
            x = block(x, mask)
            states.append(x)
        return states

    def forward(self, ids: torch.Tensor, skip_last: int = 1) -> torch.Tensor:
        """The hidden states after all but the last ``skip_last`` resblocks, through
        ``ln_final`` (``skip_last=1``: SD 2.x's penultimate layer)."""
        layers = len(self.transformer.resblocks) - skip_last
        return self.ln_final(self.hidden_states(ids, layers)[-1])

    def pooled(self, last: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """OpenCLIP's ``encode_text`` pooling: ``ln_final`` of the last layer's state at the
        end-of-text token (the highest id), times ``text_projection``."""
        final = self.ln_final(last)
        return final[torch.arange(final.shape[0]), ids.argmax(dim=-1)] @ self.text_projection


class FrozenOpenCLIPEmbedder(FrozenCLIPEmbedder):
    """SD 2.x's ``cond_stage_model``: tokenizer + ``model`` (OpenCLIP's text tower), the
    penultimate layer's states through ``ln_final`` as the context."""

    def __init__(self, model: OpenCLIPText, tokenizer: Any) -> None:
        nn.Module.__init__(self)
        self.model = model
        self._use_tokenizer(tokenizer)

    encoder_attribute = "model"

    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    def encode_chunk(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, skip_last=1)


# --- SDXL: sgm's GeneralConditioner ---------------------------------------------------------


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """sgm's ``FrozenOpenCLIPEmbedder2`` (SDXL's ``embedders.1``, ``layer="penultimate"``,
    ``legacy=False``): the penultimate resblock's states *without* ``ln_final`` as the context,
    and the pooled projection of the last resblock's (:meth:`OpenCLIPText.pooled`)."""

    def encode_chunk(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        states = self.model.hidden_states(ids, len(self.model.transformer.resblocks))
        return states[-2], self.model.pooled(states[-1], ids)

    def encode_tokens(
        self,
        tokens: torch.Tensor,
        fixes: list[list[tuple[int, torch.Tensor]]] | None = None,
    ) -> torch.Tensor:
        return self.encode_tokens_pooled(tokens, fixes)[0]

    def encode_tokens_pooled(
        self,
        tokens: torch.Tensor,
        fixes: list[list[tuple[int, torch.Tensor]]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The context of every chunk, and the pooled output of the first (as A1111 takes
        it)."""
        outputs = self._encode_chunks(tokens, fixes)
        return torch.cat([context for context, _ in outputs], dim=1), outputs[0][1]


def size_embedding(values: torch.Tensor, dim: int) -> torch.Tensor:
    """sgm's ``ConcatTimestepEmbedderND``: ``[B, n]`` numbers -> ``[B, n * dim]``, each one's
    sinusoidal embedding side by side (diffusers' ``add_time_proj``)."""
    from backends.original.unet import timestep_embedding

    batch = values.shape[0]
    return timestep_embedding(values.flatten(), dim).reshape(batch, -1)


class GeneralConditioner(nn.Module):
    """sgm's ``GeneralConditioner`` of SDXL base as A1111 runs it: ``embedders.0`` (CLIP
    ViT-L, :class:`FrozenCLIPEmbedder` at ``layer_idx`` -2) and ``embedders.1``
    (:class:`FrozenOpenCLIPEmbedder2`) on the prompt, their contexts side by side as
    ``crossattn``; ``vector`` = the pooled projection, then the embeddings of the original
    size, the crop's top-left corner (0, 0) and the target size (height, width in pixels,
    ``size_dim`` channels per number). An empty negative prompt's text parts are zeros
    (A1111's ``force_zero_embeddings=["txt"]``; diffusers' ``force_zeros_for_empty_prompt``).

    ``embeddings``: trigger word -> ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``.
    """

    def __init__(
        self, clip: FrozenCLIPEmbedder, openclip: FrozenOpenCLIPEmbedder2, size_dim: int
    ) -> None:
        super().__init__()
        self.embedders = nn.ModuleList([clip, openclip])
        self.size_dim = size_dim

    def parts(self) -> list[FrozenCLIPEmbedder]:
        return list(self.embedders)  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        return self.parts()[1].device

    @staticmethod
    def _split(embeddings: Mapping[str, Any] | None) -> list[dict[str, torch.Tensor]]:
        """Trigger word -> vectors, per text encoder (an SDXL embedding's
        :data:`models.embeddings.SDXL_KEYS`)."""
        from models.embeddings import SDXL_KEYS

        split: list[dict[str, torch.Tensor]] = [{}, {}]
        for word, vectors in (embeddings or {}).items():
            if not isinstance(vectors, Mapping) or set(SDXL_KEYS) - set(vectors):
                raise UserError(
                    f"embedding {word!r}: SDXL needs vectors for both text encoders "
                    f"({', '.join(SDXL_KEYS)}); this one has "
                    f"{', '.join(vectors) if isinstance(vectors, Mapping) else 'one tensor'}"
                )
            for index, key in enumerate(SDXL_KEYS):
                split[index][word] = vectors[key]
        return split

    def size_vector(self, batch: int, size: tuple[int, int]) -> torch.Tensor:
        """The size and crop embeddings of ``batch`` rows at ``size`` (height, width)."""
        height, width = size
        numbers = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        return size_embedding(numbers.expand(batch, -1), self.size_dim)

    def with_size(self, cond: dict[str, torch.Tensor], size: tuple[int, int]) -> dict[str, Any]:
        """``cond`` with its size embeddings for another ``size`` (the hires pass)."""
        vector = cond["vector"]
        sizes = self.size_vector(vector.shape[0], size).to(vector)
        pooled = vector[:, : vector.shape[1] - sizes.shape[1]]
        return {"crossattn": cond["crossattn"], "vector": torch.cat([pooled, sizes], dim=1)}

    def _encode(
        self,
        prompts: list[str],
        chunks: int,
        embeddings: list[dict[str, torch.Tensor]],
        size: tuple[int, int],
        zero: bool,
    ) -> dict[str, torch.Tensor]:
        clip, openclip = self.parts()
        first = clip.encode_tokens(*clip.tokens_and_fixes(prompts, chunks, embeddings[0]))
        assert isinstance(openclip, FrozenOpenCLIPEmbedder2)
        second, pooled = openclip.encode_tokens_pooled(
            *openclip.tokens_and_fixes(prompts, chunks, embeddings[1])
        )
        context = torch.cat([first, second.to(first.device, first.dtype)], dim=-1)
        if zero:
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        sizes = self.size_vector(len(prompts), size).to(pooled.device, pooled.dtype)
        return {"crossattn": context, "vector": torch.cat([pooled, sizes], dim=1)}

    def _chunks(self, prompt_lists: list[list[str]], embeddings: list[dict[str, Any]]) -> int:
        return max(
            part.chunk_count(prompts, part_embeddings)
            for prompts in prompt_lists
            for part, part_embeddings in zip(self.parts(), embeddings, strict=True)
        )

    def forward(
        self,
        prompts: list[str],
        min_chunks: int = 1,
        embeddings: Mapping[str, Any] | None = None,
        size: tuple[int, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        if size is None:
            raise ValueError("SDXL's conditioning needs the image size")
        split = self._split(embeddings)
        chunks = max(min_chunks, self._chunks([prompts], split))
        return self._encode(prompts, chunks, split, size, zero=False)

    def encode_pair(
        self,
        prompts: list[str],
        negative_prompts: list[str],
        embeddings: Mapping[str, Any] | None = None,
        size: tuple[int, int] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Cond and uncond conditioning with the same number of chunks."""
        if size is None:
            raise ValueError("SDXL's conditioning needs the image size")
        split = self._split(embeddings)
        chunks = self._chunks([prompts, negative_prompts], split)
        zero = all(prompt == "" for prompt in negative_prompts)
        return (
            self._encode(prompts, chunks, split, size, zero=False),
            self._encode(negative_prompts, chunks, split, size, zero=zero),
        )
