"""LoRA files in the kohya / A1111 layout: synthesis, parsing, and merging by hand.

A kohya LoRA for SD 1.x is a ``.safetensors`` file with three tensors per adapted module::

    lora_unet_<diffusers module path, "." → "_">.lora_down.weight   [rank, in]  or [rank, in, 1, 1]
    lora_unet_<...>.lora_up.weight                                  [out, rank] or [out, rank, 1, 1]
    lora_unet_<...>.alpha                                           []  (scalar)

and ``lora_te_text_model_encoder_layers_<i>_<self_attn_q_proj|…|mlp_fc1>`` for the CLIP text
encoder. kohya trains SD 1.x on the diffusers UNet, so the UNet names are diffusers module
paths (``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``); the 1x1 convolutions
``proj_in`` / ``proj_out`` of SD 1.x transformers carry conv-shaped weights. A module's weight
changes by ``strength * (alpha / rank) * up @ down``.

The zoo synthesises two such files per architecture (:data:`LORAS`), parses any kohya file
(:func:`read_lora`), and writes the reference the conformance check compares against: a
single-file checkpoint with LoRAs merged into the weights by hand (:func:`merge_loras`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from harness.errors import UserError

from .convert import (
    from_original_state_dict,
    original_key_map,
    save_single_file,
    single_file_format,
    to_original_state_dict,
)
from .specs import ModelSpec
from .synth import seeded_normal

UNET_PREFIX = "lora_unet_"
TEXT_PREFIX = "lora_te_"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"

# Module-name patterns (diffusers paths) a synthetic LoRA adapts.
_ATTENTION = r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
_FEED_FORWARD = r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$"
_PROJECTION = r"attentions\.\d+\.(proj_in|proj_out)$"
_TEXT_ATTENTION = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$"


@dataclass(frozen=True)
class LoraRecipe:
    """How the zoo synthesises one LoRA file."""

    seed: int
    rank: int
    alpha: float
    #: Regexes (``re.search``) over diffusers module paths of the UNet / text encoder.
    unet: tuple[str, ...]
    text_encoder: tuple[str, ...]
    #: Std of ``up @ down`` relative to the std of the weight it adapts, at strength 1 and
    #: before ``alpha / rank``.
    gain: float


#: The zoo's LoRAs. Measured on tiny (``StableDiffusionPipeline``, 64x64 px, 20 Euler
#: steps, guidance 7.5, seed 0, prompt "a photograph of an astronaut riding a horse", fp32;
#: ``load_lora_weights`` + ``set_adapters([name], adapter_weights=[s])``): mean abs pixel
#: difference (0..1 range) from the image without LoRA at strength 0 / 0.25 / 0.5 / 1.0:
#: style 0 / 0.026 / 0.055 / 0.114, detail 0 / 0.034 / 0.067 / 0.118. Both at strength 1 in
#: fp16: image finite, std 0.26 (as without LoRA).
LORAS: dict[str, LoraRecipe] = {
    "style": LoraRecipe(
        seed=101,
        rank=4,
        alpha=2.0,
        unet=(_ATTENTION,),
        text_encoder=(_TEXT_ATTENTION,),
        gain=0.4,
    ),
    "detail": LoraRecipe(
        seed=202,
        rank=8,
        alpha=4.0,
        unet=(_ATTENTION, _FEED_FORWARD, _PROJECTION),
        text_encoder=(),
        gain=0.4,
    ),
}


@dataclass(frozen=True)
class LoraLayer:
    """One adapted module of a LoRA file: ``delta W = (alpha / rank) * up @ down``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, shape: tuple[int, ...], strength: float = 1.0) -> torch.Tensor:
        """``strength * scale * up @ down`` in fp32, reshaped to the adapted weight's ``shape``."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (strength * self.scale) * product.reshape(shape)


@dataclass(frozen=True)
class LoraTarget:
    """Where a kohya module name lands in a model of a given spec."""

    #: ``unet`` or ``text_encoder``.
    component: str
    #: The weight's key in the diffusers component state dict.
    diffusers_key: str
    #: The weight's key in the original single-file layout.
    original_key: str
    shape: tuple[int, ...]


def kohya_name(component: str, module: str) -> str:
    """The kohya module name of a diffusers module path (``text_model.`` added for CLIP)."""
    if component == "unet":
        return UNET_PREFIX + module.replace(".", "_")
    if not module.startswith("text_model."):
        module = "text_model." + module
    return TEXT_PREFIX + module.replace(".", "_")


@lru_cache(maxsize=8)
def _lora_targets(spec_json: str) -> dict[str, LoraTarget]:
    spec = ModelSpec.from_dict(json.loads(spec_json))
    targets: dict[str, LoraTarget] = {}
    for original, (component, key, shape) in original_key_map(spec).items():
        if component == "vae" or not key.endswith(".weight") or len(shape) not in (2, 4):
            continue
        module = key[: -len(".weight")]
        targets[kohya_name(component, module)] = LoraTarget(component, key, original, shape)
    return targets


def lora_targets(spec: ModelSpec) -> dict[str, LoraTarget]:
    """kohya module name → :class:`LoraTarget` of every Linear / Conv weight of the UNet and
    text encoder of ``spec`` (what a LoRA for this architecture may adapt)."""
    return _lora_targets(json.dumps(spec.to_dict(), sort_keys=True))


# --------------------------------------------------------------------------- synthesis


def _modules(
    targets: dict[str, LoraTarget], component: str, patterns: tuple[str, ...]
) -> list[tuple[str, LoraTarget]]:
    selected = []
    for name, target in targets.items():
        module = target.diffusers_key[: -len(".weight")]
        if target.component == component and any(re.search(p, module) for p in patterns):
            selected.append((name, target))
    return selected


def synthesize_lora(spec: ModelSpec, name: str) -> dict[str, torch.Tensor]:
    """The tensors of the zoo LoRA ``name`` for ``spec`` (fp16 weights, fp32 alphas).

    Every tensor draws from its own generator seeded by (recipe seed, spec name and seed,
    tensor name). ``down ~ N(0, 1/fan_in)`` and ``up ~ N(0, gain² σ_W² fan_in / rank)``,
    where ``σ_W = 1/sqrt(fan_in)`` is the synthetic weight's std, so that ``up @ down`` has
    std ``gain * σ_W``.
    """
    recipe = LORAS[name]
    targets = lora_targets(spec)
    chosen = _modules(targets, "unet", recipe.unet) + _modules(
        targets, "text_encoder", recipe.text_encoder
    )
    if not chosen:
        raise ValueError(f"LoRA {name!r} adapts no module of spec {spec.name!r}")
    tensors: dict[str, torch.Tensor] = {}
    rank = recipe.rank
    for module, target in chosen:
        out_features, fan_in = target.shape[0], int(torch.tensor(target.shape[1:]).prod())
        conv = len(target.shape) == 4
        down_shape = (rank, *target.shape[1:]) if conv else (rank, fan_in)
        up_shape = (out_features, rank, 1, 1) if conv else (out_features, rank)
        tag = f"{spec.name}:{spec.seed}/lora/{name}/{module}"
        down = seeded_normal(down_shape, 0.0, fan_in**-0.5, recipe.seed, tag + DOWN)
        up = seeded_normal(up_shape, 0.0, recipe.gain / rank**0.5, recipe.seed, tag + UP)
        tensors[module + DOWN] = down.to(torch.float16)
        tensors[module + UP] = up.to(torch.float16)
        tensors[module + ALPHA] = torch.tensor(recipe.alpha, dtype=torch.float32)
    return tensors


def write_lora(spec: ModelSpec, name: str, path: Path) -> Path:
    """Write the zoo LoRA ``name`` for ``spec`` to ``path`` (``.safetensors``)."""
    from safetensors.torch import save

    recipe = LORAS[name]
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(recipe.rank),
        "ss_network_alpha": str(recipe.alpha),
        "ss_base_model_version": "sd_v1",
        "sdbench_extra": json.dumps({"kind": "lora", "name": name, "spec": spec.name}),
    }
    path.write_bytes(_sorted_header(save(synthesize_lora(spec, name), metadata=metadata)))
    return path


def _sorted_header(data: bytes) -> bytes:
    """A safetensors file with its JSON header re-serialised with sorted keys.

    safetensors writes the metadata entries in hash-map order, which varies between runs;
    sorting makes the bytes of a synthesised file identical on every write. Tensor offsets
    are relative to the end of the header, so only the header (padded with spaces to 8 bytes,
    as safetensors pads it) changes.
    """
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True, separators=(",", ":"))
    encoded = header.encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + data[8 + length :]


# --------------------------------------------------------------------------- reading


def _few(keys: list[str], count: int = 4) -> str:
    shown = ", ".join(keys[:count])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > count else "")


def read_lora(path: str | Path) -> dict[str, LoraLayer]:
    """kohya module name → :class:`LoraLayer` of a kohya / A1111 LoRA ``.safetensors`` file.

    A missing ``.alpha`` means ``alpha = rank`` (kohya's convention). Raises
    :class:`UserError` naming the file for a file that cannot be read, holds no
    ``lora_down`` / ``lora_up`` pairs, or has unpaired, unknown or mis-shaped keys.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"LoRA '{path}': expected a kohya .safetensors file")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as error:  # a truncated or foreign file: say which and why
        raise UserError(
            f"LoRA '{path}': cannot be read ({type(error).__name__}: {error}); "
            "expected a kohya .safetensors file"
        ) from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in tensors.items():
        suffix = next((s for s in (DOWN, UP, ALPHA) if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        parts.setdefault(key[: -len(suffix)], {})[suffix] = value
    bad = [f"{m}{s}" for m, p in parts.items() for s in (DOWN, UP) if s not in p] + unknown
    if not any(DOWN in p and UP in p for p in parts.values()):
        raise UserError(
            f"LoRA '{path}': no lora_down/lora_up pairs (keys: {_few(sorted(tensors))}); "
            "expected a kohya LoRA"
        )
    if bad:
        raise UserError(
            f"LoRA '{path}': unpaired or unknown keys: {_few(sorted(bad))}; expected "
            "<module>.lora_down.weight, <module>.lora_up.weight and <module>.alpha"
        )
    layers: dict[str, LoraLayer] = {}
    for module, pair in parts.items():
        down, up = pair[DOWN], pair[UP]
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
            raise UserError(
                f"LoRA '{path}': {module}: lora_up {tuple(up.shape)} does not fit "
                f"lora_down {tuple(down.shape)}; expected [out, rank] @ [rank, in]"
            )
        alpha = float(pair[ALPHA]) if ALPHA in pair else float(down.shape[0])
        layers[module] = LoraLayer(down=down, up=up, alpha=alpha)
    return layers


# --------------------------------------------------------------------------- merging


def _load_states(spec: ModelSpec, path: Path, fmt: str) -> dict[str, dict[str, torch.Tensor]]:
    """The diffusers component state dicts of a resolved model (fp32, CPU)."""
    from safetensors.torch import load_file

    if fmt == "hub":
        states: dict[str, dict[str, torch.Tensor]] = {}
        for component in ("unet", "vae", "text_encoder"):
            files = sorted((path / component).glob("*.safetensors"))
            if not files:
                raise UserError(
                    f"model '{path}': no {component}/*.safetensors; expected safetensors weights "
                    "in the hub folder"
                )
            state: dict[str, torch.Tensor] = {}
            for file in files:
                state.update(load_file(str(file)))
            if component == "text_encoder":  # saved by transformers < 5.6: text_model.* keys
                state = {k.removeprefix("text_model."): v for k, v in state.items()}
            states[component] = state
        return states
    from .convert import load_ckpt

    if fmt == "safetensors":
        original = load_file(str(path))
    else:
        data = load_ckpt(path)
        original = data.get("state_dict", data)
    states, missing = from_original_state_dict(spec, original)
    if missing:
        raise UserError(f"model '{path}': missing weights for {spec.name}: {_few(missing)}")
    return states


def merge_loras(model: str, source: str, loras: list[tuple[Path, float]], out: str | Path) -> Path:
    """Write ``model`` with ``loras`` merged into its weights by hand as one single file.

    ``model`` / ``source`` are a scenario's model reference and format (see
    :func:`models.resolve`); ``loras`` are ``(file, strength)`` pairs. Each adapted weight
    becomes ``W + Σ strength * (alpha / rank) * up @ down`` (computed in fp32 on the diffusers
    state dicts, then converted to the original layout with the zoo's key mapping). The file
    at ``out`` has the format of ``source`` (``.safetensors`` for a hub folder) and carries
    the spec metadata, so :func:`models.resolve` recognises it. A LoRA key that names no
    module of the model (or has the wrong shape) raises :class:`UserError` listing a few.
    """
    from .sources import resolve, single_file_spec
    from .zoo import zoo_spec

    resolved = resolve(model, source)
    if resolved.is_single_file:
        spec = single_file_spec(resolved.path)
    elif resolved.spec_name is not None:
        spec = zoo_spec(resolved.spec_name)
    else:
        raise UserError(f"model {model!r}: unrecognised architecture; cannot merge LoRAs")
    fmt = "safetensors" if resolved.source == "hub" else resolved.source
    out = Path(out).expanduser()
    if single_file_format(out) != fmt:
        raise UserError(f"output '{out}': expected a file name ending in .{fmt} (as the source)")

    targets = lora_targets(spec)
    states = _load_states(spec, resolved.path, resolved.source)
    states = {c: {k: v.float().clone() for k, v in s.items()} for c, s in states.items()}
    for file, strength in loras:
        layers = read_lora(file)
        unknown = sorted(module for module in layers if module not in targets)
        if unknown:
            raise UserError(
                f"LoRA '{file}': {len(unknown)} keys name no module of {spec.name}: {_few(unknown)}"
            )
        for module, layer in layers.items():
            target = targets[module]
            if layer.up.shape[0] * layer.down[0].numel() != torch.Size(target.shape).numel():
                raise UserError(
                    f"LoRA '{file}': {module}: update {tuple(layer.up.shape[:1])}x"
                    f"{tuple(layer.down.shape[1:])} does not fit the weight {target.shape}"
                )
            weights = states[target.component]
            weights[target.diffusers_key] += layer.delta(target.shape, strength)

    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.partial{out.suffix}")
    try:
        save_single_file(to_original_state_dict(spec, states), spec, temporary)
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return out
