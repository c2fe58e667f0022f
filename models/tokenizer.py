"""Offline tokenizers with the layouts and special ids of the real ones: CLIP's BPE and
T5's unigram (:func:`write_t5_tokenizer`).

The public CLIP tokenizer (``openai/clip-vit-large-patch14``) cannot be downloaded here, so
the zoo writes a stand-in with the same file layout (``vocab.json``, ``merges.txt``,
``tokenizer_config.json``, ``special_tokens_map.json``) and the same id layout:

- ids ``0 .. 255``: the 256 byte-level unicode characters (GPT-2's ``bytes_to_unicode``);
- ids ``256 .. 511``: the same characters with the end-of-word marker ``</w>``;
- then one token per BPE merge;
- ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids (49406 / 49407 for sd15).

The merges are built systematically, not learned: letter bigrams, then trigrams, then
4-grams..., each level ordered by the English letter frequency of its letters, both inside a
word and at its end (``</w>``). Ordinary English words therefore take a few tokens each, and
the files are identical on every run and machine.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .specs import ModelSpec

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
#: Letters from most to least frequent in English text; orders the merges.
LETTERS_BY_FREQUENCY = "etaoinshrdlcumwfgypbvkjxqz"
#: The longest n-gram the merge levels go up to (enough for sd15's 48894 merges).
MAX_NGRAM = 6


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from the 256 byte values to printable unicode chars."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def _ngrams(length: int) -> Iterator[tuple[str, ...]]:
    """All letter n-grams of ``length``, most frequent letters first (by summed rank)."""
    rank = {letter: index for index, letter in enumerate(LETTERS_BY_FREQUENCY)}
    grams = itertools.product(LETTERS_BY_FREQUENCY, repeat=length)
    yield from sorted(grams, key=lambda gram: (sum(rank[c] for c in gram), [rank[c] for c in gram]))


def build_merges(count: int) -> list[tuple[str, str]]:
    """``count`` BPE merges: n-gram levels 2, 3, ... each as in-word then word-final pairs.

    Every merge joins tokens that exist before it (a prefix from the previous level and one
    letter), so the BPE is consistent whatever ``count`` is.
    """
    merges: list[tuple[str, str]] = []
    known: set[str] = set(LETTERS_BY_FREQUENCY)
    for length in range(2, MAX_NGRAM + 1):
        level: list[str] = []
        for gram in _ngrams(length):
            prefix = "".join(gram[:-1])
            if prefix not in known:
                continue
            for last in (gram[-1], gram[-1] + END_OF_WORD):
                merges.append((prefix, last))
                if len(merges) == count:
                    return merges
            level.append(prefix + gram[-1])
        known.update(level)
    raise ValueError(f"vocab_size needs {count} merges, more than {MAX_NGRAM}-grams provide")


def build_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (token → id, ``vocab_size`` entries) and the merges that build it."""
    chars = list(bytes_to_unicode().values())
    base = chars + [char + END_OF_WORD for char in chars]
    n_merges = vocab_size - len(base) - 2
    if n_merges < 0:
        raise ValueError(f"vocab_size must be at least {len(base) + 2}, got {vocab_size}")
    merges = build_merges(n_merges) if n_merges else []
    tokens = base + ["".join(pair) for pair in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != vocab_size:
        raise AssertionError(f"duplicate tokens: {len(tokens)} built, {len(vocab)} distinct")
    return vocab, merges


def tokenizer_files(
    spec: ModelSpec | None, settings: dict[str, Any] | None = None
) -> dict[str, str]:
    """File name → text of the tokenizer folder of ``spec`` (``settings``: another of its
    tokenizers' settings than ``spec.tokenizer``, e.g. SDXL's ``tokenizer_2``, or a
    multi-stage model's, without a spec)."""
    if settings is None:
        if spec is None:
            raise ValueError("tokenizer_files needs a spec or settings")
        settings = spec.tokenizer
    vocab_size = int(settings["vocab_size"])
    max_length = int(settings.get("model_max_length", 77))
    vocab, merges = build_vocab(vocab_size)
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        # SD 1.x pads with EOS; the SD 2.x release's tokenizer pads with "!" (id 0), as
        # OpenCLIP's own tokenizer pads with 0
        "pad_token": settings.get("pad_token", EOS_TOKEN),
    }
    config: dict[str, Any] = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": merges_text,
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2, sort_keys=True) + "\n",
    }


def write_tokenizer(
    spec: ModelSpec | None, folder: Path, settings: dict[str, Any] | None = None
) -> Path:
    """Write the tokenizer files of ``spec`` (or of its ``settings``, as
    :func:`tokenizer_files`) into ``folder`` (created); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(spec, settings).items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


#: T5's sentinel tokens ``<extra_id_0>`` … at the end of its vocabulary.
T5_EXTRA_IDS = 100


def t5_pieces(vocab_size: int) -> list[tuple[str, float]]:
    """A T5-style unigram vocabulary of ``vocab_size - T5_EXTRA_IDS`` pieces with scores:
    ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 (T5's ids), the word-start marker ``▁``, letters with
    and without it, then the in-word and word-start n-grams of :func:`build_merges`' order,
    scored so that longer, more frequent pieces win; the same on every run."""
    count = vocab_size - T5_EXTRA_IDS
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0),
                                       ("\u2581", -2.0)]
    seen = {piece for piece, _ in pieces}
    candidates = [*LETTERS_BY_FREQUENCY, *("\u2581" + c for c in LETTERS_BY_FREQUENCY)]
    for left, right in build_merges(2 * count):
        gram = left + right.removesuffix(END_OF_WORD)
        candidates += [gram, "\u2581" + gram]
    for piece in candidates:
        if len(pieces) == count:
            break
        if piece not in seen:
            seen.add(piece)
            # longer pieces score higher, so whole n-grams beat their letters
            pieces.append((piece, -10.0 + len(piece.lstrip("\u2581")) - len(pieces) / count))
    if len(pieces) != count:
        raise ValueError(f"vocab_size {vocab_size}: only {len(pieces)} pieces built")
    return pieces


def write_t5_tokenizer(settings: dict[str, Any], folder: Path) -> Path:
    """A T5 tokenizer folder (``tokenizer.json`` + config, as transformers saves one) of
    ``settings`` (``vocab_size``, ``model_max_length``) into ``folder``; returns it."""
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer(vocab=t5_pieces(int(settings["vocab_size"])),
                            extra_ids=T5_EXTRA_IDS)
    tokenizer.model_max_length = int(settings.get("model_max_length", 77))
    tokenizer.save_pretrained(str(folder))
    return folder
