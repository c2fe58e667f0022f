"""Prompt chunking of the original backend: 75-token chunks, BOS/EOS, padded to 77."""

from __future__ import annotations

import pytest
import torch

from backends.original.checkpoint import load_latent_diffusion
from backends.original.text import CHUNK_TOKENS, FrozenCLIPEmbedder
from models import config_folder, resolve


@pytest.fixture(scope="module")
def embedder() -> FrozenCLIPEmbedder:
    model = load_latent_diffusion(
        resolve("tiny", "safetensors").path, spec_name="tiny", config_dir=config_folder("tiny")
    )
    text: FrozenCLIPEmbedder = model.cond_stage_model
    return text


def prompt_of(embedder: FrozenCLIPEmbedder, tokens: int) -> tuple[str, list[int]]:
    """A prompt of exactly ``tokens`` tokens (and its ids), from words of any token length."""
    words: list[str] = []
    ids: list[int] = []
    vocabulary = ["cat", "dog", "red", "blue", "house", "tree", "sky", "sea"]
    i = 0
    while len(ids) < tokens:
        candidate = " ".join([*words, vocabulary[i % len(vocabulary)]])
        candidate_ids = embedder.tokenizer(candidate, add_special_tokens=False)["input_ids"]
        if len(candidate_ids) > tokens:
            break
        words, ids = candidate.split(" "), candidate_ids
        i += 1
    while len(ids) < tokens:  # top up with a one-token word
        words.append("a")
        ids = embedder.tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    assert len(ids) == tokens
    return " ".join(words), ids


def test_short_prompt_is_one_chunk_like_diffusers(embedder: FrozenCLIPEmbedder) -> None:
    chunks = embedder.tokenize_chunks("a photo of a cat")
    reference = embedder.tokenizer(
        "a photo of a cat", padding="max_length", max_length=77, truncation=True
    )["input_ids"]
    assert chunks == [reference]


def test_100_token_prompt_gives_two_chunks_of_77(embedder: FrozenCLIPEmbedder) -> None:
    prompt, ids = prompt_of(embedder, 100)
    chunks = embedder.tokenize_chunks(prompt)
    assert [len(chunk) for chunk in chunks] == [77, 77]
    first, second = chunks
    assert first == [embedder.id_start, *ids[:CHUNK_TOKENS], embedder.id_end]
    assert second[: 2 + 25] == [embedder.id_start, *ids[CHUNK_TOKENS:], embedder.id_end]
    assert second[27:] == [embedder.id_pad] * 50
    with torch.no_grad():
        context = embedder([prompt])
    assert context.shape == (1, 154, 32)


def test_tokens_past_77_change_the_conditioning(embedder: FrozenCLIPEmbedder) -> None:
    prompt, _ = prompt_of(embedder, 100)
    changed = prompt.rsplit(" ", 1)[0] + " house"
    assert embedder.tokenize_chunks(changed)[0] == embedder.tokenize_chunks(prompt)[0]
    with torch.no_grad():
        a, b = embedder([prompt]), embedder([changed])
    assert torch.equal(a[:, :77], b[:, :77])
    assert not torch.allclose(a[:, 77:], b[:, 77:])


def test_negative_prompt_is_padded_to_the_same_chunks(embedder: FrozenCLIPEmbedder) -> None:
    prompt, _ = prompt_of(embedder, 160)
    with torch.no_grad():
        cond, uncond = embedder.encode_pair([prompt], [""])
        empty = embedder([""])
    assert cond.shape == uncond.shape == (1, 3 * 77, 32)
    for i in range(3):  # the padding chunks encode an empty prompt
        assert torch.allclose(uncond[:, 77 * i : 77 * (i + 1)], empty)
    with torch.no_grad():
        cond, uncond = embedder.encode_pair(["cat"], [prompt])
    assert cond.shape == uncond.shape == (1, 3 * 77, 32)
