"""LoRA and textual inversion on a diffusers pipeline, for :mod:`backends.diffusers_backend`.

- :class:`LoraAdapters`: kohya / A1111 ``.safetensors`` LoRAs through ``load_lora_weights``
  (peft), one adapter per file, loaded once per session and weighted per request with
  ``set_adapters``; no LoRA = ``disable_lora()`` (the base model's exact output). Keys that
  name no module of the model are an error naming the file (diffusers and peft only warn).
  A network type beyond LoRA / LoCon (:func:`models.file_network_type`) that diffusers'
  loader refuses, or loads only in part (it drops DoRA's ``dora_scale`` with a warning), is
  ``unsupported`` with the loader's own message: which files load is the finding, so
  nothing converts them behind its back.
- :class:`TextualInversions`: A1111 embeddings through ``load_textual_inversion``, from a
  file or from vectors handed over by hand, keyed by (trigger word, source).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from backends.base import EmbeddingRef, LoraRef, Request
from harness.errors import UnsupportedError, UserError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

#: Key prefixes of kohya / A1111 LoRA files (``lora_te1_`` / ``lora_te2_`` are SDXL's).
KOHYA_PREFIXES: tuple[str, ...] = ("lora_unet_", "lora_te")
#: The network types whose failure to load is an error, not a finding.
PLAIN_TYPES: frozenset[str] = frozenset({"lora", "locon"})
#: Loader warnings that say part of the file was left out.
_DROPPED = re.compile(r"filter(ed|ing)? out|not compatible|will be ignored", re.IGNORECASE)


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def loader_warnings() -> Iterator[list[str]]:
    """The warnings diffusers logs inside the block, captured instead of printed (the
    backend silences diffusers' logger otherwise)."""
    logger = logging.getLogger("diffusers")
    handlers, level = logger.handlers[:], logger.level
    captured = _Captured()
    logger.handlers, logger.level = [captured], logging.WARNING
    try:
        yield captured.messages
    finally:
        logger.handlers, logger.level = handlers, level


def _diffusers_version() -> str:
    from importlib.metadata import version

    return f"diffusers {version('diffusers')}"


def lora_adapter_name(path: Path) -> str:
    """A stable adapter name for a LoRA file: its stem (made a valid module name) and a hash
    of its absolute path, so two files with the same stem do not collide."""
    stem = re.sub(r"\W", "_", path.stem)
    digest = hashlib.sha1(str(path.expanduser().resolve()).encode()).hexdigest()[:8]
    return f"{stem}_{digest}"


@dataclass(frozen=True)
class _TextEncoder:
    """One text encoder of a pipeline, with what LoRA and embedding files address it by."""

    module: torch.nn.Module
    tokenizer: Any
    #: kohya's prefix of its module names (``lora_te_``; SDXL's ``lora_te1_`` / ``lora_te2_``),
    #: with ``text_model_`` when the module has no such level: transformers ≥ 5.6 flattened
    #: ``CLIPTextModel``, while kohya files name its modules ``text_model_…`` either way.
    kohya_prefix: str
    #: The key of its vectors in an SDXL embedding file (``clip_l`` / ``clip_g``); None for a
    #: model with one text encoder.
    embedding_key: str | None


def _text_encoders(pipe: Any) -> list[_TextEncoder]:
    """The pipeline's text encoders: ``text_encoder``, and SDXL's ``text_encoder_2``."""
    from models.embeddings import SDXL_KEYS
    from models.lora import kohya_text_prefixes

    pairs = [(pipe.text_encoder, pipe.tokenizer)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.text_encoder_2, pipe.tokenizer_2))
    keys = (None,) if len(pairs) == 1 else SDXL_KEYS
    return [
        _TextEncoder(module, tokenizer,
                     prefix if hasattr(module, "text_model") else prefix + "text_model_", key)
        for (module, tokenizer), prefix, key in zip(
            pairs, kohya_text_prefixes(len(pairs)), keys, strict=True)
    ]


def kohya_module_names(pipe: Any) -> dict[str, str]:
    """The kohya names (``lora_unet_…`` / ``lora_te_text_model_…``) of the modules a LoRA
    can adapt — Linear and Conv2d layers, diffusers module path with ``.`` → ``_`` — each
    mapped to itself; and for SDXL also the UNet's sgm names (``lora_unet_input_blocks_…``,
    what kohya's SDXL training writes), mapped to the diffusers name of the same module."""
    from models.convert import unet_prefix_map, unet_to_original_key

    adaptable = (torch.nn.Linear, torch.nn.Conv2d)
    unet = pipe.unet
    encoders = _text_encoders(pipe)
    sdxl = len(encoders) == 2
    prefixes = unet_prefix_map(dict(unet.config)) if sdxl else None
    names: dict[str, str] = {}
    for name, module in unet.named_modules():
        if isinstance(module, adaptable):
            canonical = "lora_unet_" + name.replace(".", "_")
            names[canonical] = canonical
            if prefixes is not None:
                original = unet_to_original_key(name + ".weight", prefixes)
                names["lora_unet_" + original.removesuffix(".weight").replace(".", "_")] = (
                    canonical)
    for encoder in encoders:
        for name, module in encoder.module.named_modules():
            if isinstance(module, adaptable):
                kohya = encoder.kohya_prefix + name.replace(".", "_")
                names[kohya] = kohya
    return names


def _kohya_wrapped(model: torch.nn.Module, adapter: str, prefix: str) -> set[str]:
    """kohya names of the modules of ``model`` that carry LoRA ``adapter`` (peft layers)."""
    return {
        prefix + name.replace(".", "_")
        for name, module in model.named_modules()
        if adapter in getattr(module, "lora_A", {})
    }


def _lora_key_names(path: Path) -> list[str]:
    """The tensor names of a LoRA file (without reading the tensors)."""
    from safetensors import safe_open

    if path.suffix.lower() != ".safetensors":
        raise UserError(f"LoRA '{path}': expected a kohya .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(
            f"LoRA '{path}': cannot be read ({type(error).__name__}: {error})"
        ) from None


def _few(names: list[str] | set[str], count: int = 3) -> str:
    ordered = sorted(names)
    more = f" (+{len(ordered) - count} more)" if len(ordered) > count else ""
    return ", ".join(ordered[:count]) + more


def _source_key(ref: EmbeddingRef) -> str:
    """What identifies an embedding's source: its file, or a hash of the vectors given."""
    if ref.path is not None:
        return f"file:{Path(ref.path).expanduser().resolve()}"
    if ref.vectors is None:
        raise ValueError(f"embedding {ref.token!r}: neither path nor vectors given")
    parts = ref.vectors if isinstance(ref.vectors, dict) else {"": ref.vectors}
    digest = hashlib.sha1()
    for key in sorted(parts):
        digest.update(key.encode())
        digest.update(parts[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    shapes = {key: tuple(value.shape) for key, value in parts.items()}
    return f"vectors:{shapes}:{digest.hexdigest()}"


class LoraAdapters:
    """The LoRA files a session has loaded into its pipeline, as peft adapters."""

    def __init__(self, pipe: StableDiffusionPipeline) -> None:
        self.pipe = pipe
        #: LoRA file (absolute) -> adapter name.
        self.files: dict[Path, str] = {}
        #: kohya name of each module a LoRA can adapt -> its diffusers-path kohya name
        #: (computed on first use).
        self.kohya_names: dict[str, str] | None = None

    def apply(self, loras: tuple[LoraRef, ...]) -> None:
        """Load the request's LoRA files (once per session) and activate them at their
        strengths; with none, disable every adapter (the base model's exact output)."""
        pipe = self.pipe
        if not loras:
            if self.files:
                pipe.disable_lora()
            return
        weights: dict[str, float] = {}
        for ref in loras:
            name = self._load_lora(Path(ref.path))
            weights[name] = weights.get(name, 0.0) + float(ref.strength)
        pipe.enable_lora()
        pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))

    def _load_lora(self, path: Path) -> str:
        key = path.expanduser().resolve()
        name = self.files.get(key)
        if name is not None:
            return name
        name = lora_adapter_name(path)
        expected = self._check_kohya_keys(path, _lora_key_names(path))
        from models import file_network_type

        network = file_network_type(path)
        with loader_warnings() as warned:
            try:
                self.pipe.load_lora_weights(str(path), adapter_name=name)
            except (ValueError, KeyError, RuntimeError, OSError, TypeError) as error:
                self._drop_adapter(name)
                first = (str(error).strip().splitlines() or [""])[0][:200]
                said = f"{type(error).__name__}: {first}"
                if network not in PLAIN_TYPES:
                    raise UnsupportedError(
                        f"{_diffusers_version()} does not load a {network} file ({said}): "
                        f"LoRA '{path}'"
                    ) from error
                raise UserError(f"LoRA '{path}': diffusers cannot load it ({said})") from error
        dropped = [message for message in warned if _DROPPED.search(message)]
        if dropped:
            self._drop_adapter(name)
            raise UnsupportedError(
                f"{_diffusers_version()} loads a {network} file only in part "
                f"({dropped[0].splitlines()[0][:300]}): LoRA '{path}'"
            )
        applied = self._wrapped_modules(name)
        missing = expected - applied
        if missing or not applied:
            self._drop_adapter(name)
            what = _few(missing) if missing else "no module at all"
            raise UserError(
                f"LoRA '{path}': diffusers did not apply {len(missing) or 'any'} of its "
                f"modules: {what}"
            )
        self.files[key] = name
        return name

    def _check_kohya_keys(self, path: Path, keys: list[str]) -> set[str]:
        """The kohya module names of a file's keys, checked against the model.

        diffusers and peft only warn about keys that name no module; here they are an error.
        A file without kohya keys (a diffusers / peft LoRA) is left to diffusers (and to the
        check after loading that it adapted at least one module).
        """
        kohya = [key for key in keys if key.startswith(KOHYA_PREFIXES)]
        if not kohya:
            return set()
        others = [key for key in keys if not key.startswith(KOHYA_PREFIXES)]
        if others:
            raise UserError(
                f"LoRA '{path}': keys outside the kohya layout (lora_unet_… / lora_te_…): "
                f"{_few(others)}"
            )
        if self.kohya_names is None:
            self.kohya_names = kohya_module_names(self.pipe)
        names = {key.split(".", 1)[0] for key in kohya}
        unknown = names - self.kohya_names.keys()
        if unknown:
            bad_keys = [key for key in kohya if key.split(".", 1)[0] in unknown]
            raise UserError(
                f"LoRA '{path}': {len(unknown)} of its {len(names)} modules name nothing in "
                f"this model: {_few(bad_keys)}"
            )
        return {self.kohya_names[name] for name in names}

    def _wrapped_modules(self, adapter: str) -> set[str]:
        """kohya names (diffusers paths) of the modules that carry ``adapter`` after loading."""
        wrapped = _kohya_wrapped(self.pipe.unet, adapter, "lora_unet_")
        for encoder in _text_encoders(self.pipe):
            wrapped |= _kohya_wrapped(encoder.module, adapter, encoder.kohya_prefix)
        return wrapped

    def _drop_adapter(self, name: str) -> None:
        loaded = {n for names in self.pipe.get_list_adapters().values() for n in names}
        if name in loaded:
            self.pipe.delete_adapters(name)


class TextualInversions:
    """The embeddings a session has loaded into its tokenizer and text encoder."""

    def __init__(self, pipe: StableDiffusionPipeline) -> None:
        self.pipe = pipe
        #: trigger word -> (source key, every token it added to the tokenizer).
        self.loaded: dict[str, tuple[str, list[str]]] = {}

    def apply(self, request: Request) -> None:
        """Load the request's embeddings (once per session, keyed by token and source).

        An embedding loaded earlier is unloaded when its token now comes from another source,
        or when a request that does not ask for it has its token in a prompt (the tokenizer
        would otherwise still map the word to the embedding).
        """
        wanted = {ref.token: ref for ref in request.embeddings}
        text = f"{request.prompt}\n{request.negative_prompt}"
        for token, (source, added) in list(self.loaded.items()):
            ref = wanted.get(token)
            if (ref is None and token in text) or (ref is not None and _source_key(ref) != source):
                for encoder in _text_encoders(self.pipe):
                    self.pipe.unload_textual_inversion(
                        tokens=added, tokenizer=encoder.tokenizer, text_encoder=encoder.module
                    )
                del self.loaded[token]
        for ref in request.embeddings:
            if ref.token not in self.loaded:
                self._load_embedding(ref)

    def _load_embedding(self, ref: EmbeddingRef) -> None:
        from models import read_embedding

        pipe = self.pipe
        source = _source_key(ref)
        encoders = _text_encoders(pipe)
        if ref.path is not None:
            path = Path(ref.path)
            if not path.is_file():
                raise UserError(f"embedding '{path}': no such file")
            if len(encoders) == 1:
                try:
                    pipe.load_textual_inversion(str(path), token=ref.token, local_files_only=True)
                except Exception as error:  # noqa: BLE001 - torch / safetensors / diffusers
                    first = (str(error).strip().splitlines() or [""])[0][:200]
                    raise UserError(
                        f"embedding '{path}': cannot be loaded, truncated or not an A1111 "
                        f"embedding ({type(error).__name__}: {first})"
                    ) from error
                vectors = None
            else:  # SDXL: diffusers loads one encoder's tensor at a time (its docs' recipe)
                vectors = read_embedding(path)[1]
        else:
            assert ref.vectors is not None
            vectors = ref.vectors
        if vectors is not None:
            if isinstance(vectors, dict) != (len(encoders) == 2):
                what = "an SDXL embedding (clip_l, clip_g)" if isinstance(vectors, dict) else (
                    "one tensor")
                raise UserError(
                    f"embedding {ref.token!r}: {what} for a model with {len(encoders)} text "
                    "encoder(s)"
                )
            for encoder in encoders:
                key = encoder.embedding_key
                part = vectors[key] if isinstance(vectors, dict) and key else vectors
                assert isinstance(part, torch.Tensor)
                part = part.detach().to("cpu")
                pipe.load_textual_inversion(
                    part.reshape(-1, part.shape[-1]), token=ref.token,
                    text_encoder=encoder.module, tokenizer=encoder.tokenizer,
                )
        added = [ref.token]
        vocabulary = pipe.tokenizer.get_vocab()
        while f"{ref.token}_{len(added)}" in vocabulary:
            added.append(f"{ref.token}_{len(added)}")
        self.loaded[ref.token] = (source, added)
