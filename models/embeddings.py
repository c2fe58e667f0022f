"""Textual-inversion embeddings in the file formats A1111 users have.

- ``.pt`` (A1111's own, ``modules/textual_inversion/textual_inversion.py``): a pickled dict
  ``{"string_to_token": {"*": 265}, "string_to_param": {"*": tensor[n, hidden]}, "name",
  "step", "sd_checkpoint", "sd_checkpoint_name"}``; it holds only tensors, strings, ints and
  ``None``, so ``torch.load(weights_only=True)`` reads it and no other pickle is accepted.
- ``.safetensors``: one tensor ``emb_params`` ``[n, hidden]`` (A1111 writes this name), or a
  single tensor under any name (as diffusers' own textual-inversion files).

- SDXL ``.safetensors``: ``clip_l`` ``[n, 768]`` and ``clip_g`` ``[n, 1280]``, the vectors of
  each text encoder (what A1111 and kohya write for SDXL); read as a dict of the two.

The trigger word is the file stem (A1111's rule), whatever name the file stores. ``n`` vectors
take ``n`` token positions in the prompt.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import UserError

from .specs import ModelSpec
from .synth import EMBEDDING_STD, seeded_normal

#: Per text encoder, the tensor names of an SDXL embedding (CLIP ViT-L, OpenCLIP bigG).
SDXL_KEYS = ("clip_l", "clip_g")
#: An embedding's vectors: ``[n, hidden]``, or SDXL's per text encoder (:data:`SDXL_KEYS`).
Vectors = torch.Tensor | dict[str, torch.Tensor]

#: The token id A1111 stores under ``string_to_token["*"]`` (the id of ``*`` in CLIP's vocab).
A1111_STAR_TOKEN = 265
_EXPECTED = (
    "expected an A1111 embedding: a .pt dict with string_to_param, or a .safetensors file "
    "with emb_params or a single tensor"
)


@dataclass(frozen=True)
class EmbeddingRecipe:
    """How the zoo synthesises one embedding file."""

    seed: int
    vectors: int
    #: ``pt`` (A1111 pickle) or ``safetensors`` (``emb_params``).
    fmt: str


#: The zoo's embeddings; the vectors have the std of the synthetic token embeddings
#: (``EMBEDDING_STD``), so the trigger word behaves like an ordinary token of the model.
EMBEDDINGS: dict[str, EmbeddingRecipe] = {
    "sbstyle": EmbeddingRecipe(seed=301, vectors=1, fmt="pt"),
    "sbmulti": EmbeddingRecipe(seed=302, vectors=3, fmt="safetensors"),
}


def embedding_format(name: str, spec: ModelSpec) -> str:
    """The format the zoo writes embedding ``name`` in for ``spec``: its recipe's, and
    ``safetensors`` for SDXL (whose embeddings are ``clip_l`` / ``clip_g`` files)."""
    return "safetensors" if spec.family == "sdxl" else EMBEDDINGS[name].fmt


def embedding_file_name(name: str, spec: ModelSpec) -> str:
    """``<name>.pt`` or ``<name>.safetensors`` as the zoo embedding ``name`` is written."""
    return f"{name}.{embedding_format(name, spec)}"


def synthesize_embedding(spec: ModelSpec, name: str) -> Vectors:
    """The vectors ``[n, hidden]`` (fp32) of the zoo embedding ``name`` for ``spec``; for
    SDXL, a dict of each text encoder's (``clip_g`` drawn under its own tag)."""
    recipe = EMBEDDINGS[name]
    tag = f"{spec.name}:{spec.seed}/embedding/{name}"

    def draw(config: dict[str, object], suffix: str) -> torch.Tensor:
        hidden = int(config["hidden_size"])  # type: ignore[call-overload]
        shape = (recipe.vectors, hidden)
        return seeded_normal(shape, 0.0, EMBEDDING_STD, recipe.seed, tag + suffix)

    if spec.text_encoder_2 is None:
        return draw(spec.text_encoder, "")
    clip_l, clip_g = SDXL_KEYS
    return {clip_l: draw(spec.text_encoder, ""), clip_g: draw(spec.text_encoder_2, "/clip_g")}


def write_embedding(spec: ModelSpec, name: str, path: Path) -> Path:
    """Write the zoo embedding ``name`` for ``spec`` to ``path`` in its format."""
    vectors = synthesize_embedding(spec, name)
    if isinstance(vectors, dict):
        from safetensors.torch import save_file

        save_file(vectors, str(path), metadata={"format": "pt"})
    elif embedding_format(name, spec) == "pt":
        data = {
            "string_to_token": {"*": A1111_STAR_TOKEN},
            "string_to_param": {"*": vectors},
            "name": name,
            "step": 0,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        }
        torch.save(data, path)
    else:
        from safetensors.torch import save_file

        save_file({"emb_params": vectors}, str(path), metadata={"format": "pt"})
    return path


def _check_vectors(path: Path, value: object, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or value.numel() == 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise UserError(f"embedding '{path}': {where} is {shape}; expected a tensor [n, hidden]")
    return value.reshape(-1, value.shape[-1]).float()


def _read_pt(path: Path) -> torch.Tensor:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused a class or a callable
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UserError(
            f"embedding '{path}': refused to unpickle objects other than tensors and plain "
            f"data ({first[:120]}); {_EXPECTED}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise UserError(
            f"embedding '{path}': cannot be read ({type(error).__name__}), truncated or not a "
            f"torch file; {_EXPECTED}"
        ) from None
    params = data.get("string_to_param") if isinstance(data, dict) else None
    if not isinstance(params, dict) or len(params) != 1:
        found = sorted(map(str, data))[:6] if isinstance(data, dict) else type(data).__name__
        raise UserError(f"embedding '{path}': no string_to_param (found {found}); {_EXPECTED}")
    return _check_vectors(path, next(iter(params.values())), "string_to_param")


def _read_safetensors(path: Path) -> Vectors:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise UserError(
            f"embedding '{path}': cannot be read ({type(error).__name__}), truncated or not a "
            f"safetensors file; {_EXPECTED}"
        ) from None
    if "emb_params" in tensors:
        return _check_vectors(path, tensors["emb_params"], "emb_params")
    if set(SDXL_KEYS) <= set(tensors):
        sdxl = {key: _check_vectors(path, tensors[key], key) for key in SDXL_KEYS}
        if len({len(value) for value in sdxl.values()}) != 1:
            raise UserError(
                f"embedding '{path}': clip_l has {len(sdxl['clip_l'])} vectors and clip_g "
                f"{len(sdxl['clip_g'])}; expected as many in both"
            )
        return sdxl
    if len(tensors) == 1:
        key, value = next(iter(tensors.items()))
        return _check_vectors(path, value, key)
    raise UserError(f"embedding '{path}': no emb_params among {sorted(tensors)[:6]}; {_EXPECTED}")


def read_embedding(path: str | Path) -> tuple[str, Vectors]:
    """``(trigger word, vectors [n, hidden] fp32)`` of an A1111 embedding file (SDXL: a dict of
    ``clip_l`` and ``clip_g`` vectors).

    The trigger word is the file stem. Raises :class:`UserError` (one line, naming the file and
    what was expected) for a missing, truncated or corrupt file, a pickle holding anything but
    tensors and plain data, or an unknown layout.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"embedding '{path}': no such file")
    suffix = path.suffix.lower()
    vectors: Vectors
    if suffix in (".pt", ".bin"):
        vectors = _read_pt(path)
    elif suffix == ".safetensors":
        vectors = _read_safetensors(path)
    else:
        raise UserError(f"embedding '{path}': unknown suffix {suffix!r}; {_EXPECTED}")
    parts = vectors.values() if isinstance(vectors, dict) else [vectors]
    if not all(torch.isfinite(part).all() for part in parts):
        raise UserError(f"embedding '{path}': vectors are not finite; {_EXPECTED}")
    return path.stem, vectors
