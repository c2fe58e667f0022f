"""LoRA files in the kohya / LyCORIS layouts: synthesis, parsing, and merging by hand.

A kohya LoRA for SD 1.x is a ``.safetensors`` file with three tensors per adapted module::

    lora_unet_<diffusers module path, "." → "_">.lora_down.weight   [rank, in]  or [rank, in, k, k]
    lora_unet_<...>.lora_up.weight                                  [out, rank] or [out, rank, 1, 1]
    lora_unet_<...>.alpha                                           []  (scalar)

and ``lora_te_text_model_encoder_layers_<i>_<self_attn_q_proj|…|mlp_fc1>`` for the CLIP text
encoder. kohya trains SD 1.x on the diffusers UNet, so the UNet names are diffusers module
paths (``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``); the 1x1 convolutions
``proj_in`` / ``proj_out`` of SD 1.x transformers carry conv-shaped weights. SDXL files name
the UNet's modules by sgm's original paths (``lora_unet_input_blocks_4_1_transformer_blocks_0_
attn1_to_q``) and the two text encoders ``lora_te1_…`` (CLIP ViT-L) and ``lora_te2_…``
(OpenCLIP bigG, in transformers' names), as kohya's ``sdxl_train_network.py`` writes them.

The network types (:data:`harness.vocabulary.NETWORK_TYPES`) share those names and differ in
the tensors per module (:data:`LAYOUTS`); each gives an unscaled update ``U`` of the weight
``W`` (:meth:`LoraLayer.updown`), and a module's weight changes as A1111's built-in network
support changes it (``extensions-builtin/Lora/network*.py``), :meth:`LoraLayer.delta`::

    lora / locon   U = up @ down                          (a k x k down, a 1x1 up)
    loha           U = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)
    lokr           U = kron(w1, w2), w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b (w2 alike)
    scale          alpha / rank (rank: lora_down's, hada_w1_b's, the factored lokr_w*_b's);
                   1 without alpha, or for a LoKr with both factors whole
    delta          strength * scale * U
    with dora_scale m:  strength * (m * (W + scale U) / ||W + scale U|| - W)

where ``||·||`` is the norm of each input column (``m`` shaped ``[1, in, …]``, A1111's and
the DoRA paper's convention) or of each output row (``m`` shaped ``[out, 1, …]``, LyCORIS'
``wd_on_out``), told apart by the shape of ``m``.

The zoo synthesises such files per architecture (:data:`LORAS`: two plain LoRAs and one of
every other type), parses any of them (:func:`read_lora`), names a file's type
(:func:`network_type`, :func:`file_network_type`), and writes the reference the conformance
check compares against: a single-file checkpoint with the files merged into the weights by
hand (:func:`merge_loras`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from harness.errors import UserError

from .convert import UNET_PREFIX as UNET_FILE_PREFIX
from .convert import (
    from_original_state_dict,
    original_slots,
    save_single_file,
    single_file_format,
    to_original_state_dict,
)
from .specs import ModelSpec
from .synth import seeded_normal

UNET_PREFIX = "lora_unet_"
TEXT_PREFIX = "lora_te_"
#: kohya's ``ss_base_model_version`` per family.
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2_768_v", "sdxl": "sdxl_base_v1-0"}
DOWN, UP, ALPHA, DORA = ".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale"

#: Tensors per module of each layout, by key suffix. A LoRA and a LoHa need all of theirs; a
#: LoKr each of its two factors whole (``lokr_w1``) or as a pair (``lokr_w1_a`` + ``_b``).
LAYOUTS: dict[str, tuple[str, ...]] = {
    "lora": ("lora_down.weight", "lora_up.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}
#: Keys any layout may carry besides its own.
SHARED_KEYS: tuple[str, ...] = ("alpha", "dora_scale")
#: Keys of layouts that exist in the wild and are not applied here: an error names them.
NOT_APPLIED: dict[str, str] = {
    "lora_mid.weight": "a LoCon CP/Tucker mid factor",
    "hada_t1": "a LoHa CP/Tucker factor",
    "hada_t2": "a LoHa CP/Tucker factor",
    "lokr_t2": "a LoKr CP/Tucker factor",
    "diff": "a full-weight difference (LyCORIS full)",
    "diff_b": "a full-weight difference (LyCORIS full)",
    "oft_blocks": "an OFT rotation",
    "oft_diag": "an OFT rotation",
    "on_input": "an IA3 scale",
    "w_norm": "a norm-layer network",
    "b_norm": "a norm-layer network",
    "a1.weight": "a GLoRA factor",
    "scale": "an explicit scale",
    "bias": "a bias update",
}

# Module-name patterns (diffusers paths) a synthetic LoRA adapts.
_ATTENTION = r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
_FEED_FORWARD = r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$"
_PROJECTION = r"attentions\.\d+\.(proj_in|proj_out)$"
_RESNET_CONV = r"resnets\.\d+\.(conv1|conv2)$"
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
    #: Std of the update ``U`` relative to the std of the weight it adapts, at strength 1
    #: and before ``alpha / rank``.
    gain: float
    #: The layout of its tensors (:data:`LAYOUTS`), and whether it carries DoRA magnitudes.
    layout: str = "lora"
    dora: bool = False
    #: LoKr: the size of the whole factor ``lokr_w1`` along each dimension (at most).
    factor: int = 4


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
    "locon": LoraRecipe(
        seed=303,
        rank=4,
        alpha=2.0,
        unet=(_ATTENTION, _RESNET_CONV),
        text_encoder=(),
        gain=0.4,
    ),
    "loha": LoraRecipe(
        seed=404,
        rank=4,
        alpha=4.0,
        unet=(_ATTENTION, _FEED_FORWARD, _RESNET_CONV),
        text_encoder=(_TEXT_ATTENTION,),
        gain=0.4,
        layout="loha",
    ),
    "lokr": LoraRecipe(
        seed=505,
        rank=4,
        alpha=4.0,
        unet=(_ATTENTION, _FEED_FORWARD, _RESNET_CONV),
        text_encoder=(_TEXT_ATTENTION,),
        gain=0.4,
        layout="lokr",
    ),
    "dora": LoraRecipe(
        seed=606,
        rank=4,
        alpha=4.0,
        unet=(_ATTENTION, _PROJECTION),
        text_encoder=(_TEXT_ATTENTION,),
        gain=0.4,
        dora=True,
    ),
}
#: The std of the DoRA magnitudes' log around the columns' norms (a trained DoRA's drift).
DORA_SPREAD = 0.2


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One adapted module of a network file: its tensors by key suffix (``lora_down.weight``,
    ``hada_w1_a``, ``lokr_w2_b``…, without ``alpha`` and ``dora_scale``), its layout and its
    ``alpha`` (``None``: none stored). See the module docstring for what it does to ``W``."""

    layout: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    @property
    def down(self) -> torch.Tensor:
        return self.tensors["lora_down.weight"]

    @property
    def up(self) -> torch.Tensor:
        return self.tensors["lora_up.weight"]

    @property
    def rank(self) -> int | None:
        """The rank ``alpha`` is divided by (``None`` for a LoKr with both factors whole)."""
        for key in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
            if key in self.tensors:
                return int(self.tensors[key].shape[0])
        return None

    @property
    def scale(self) -> float:
        rank = self.rank
        return self.alpha / rank if self.alpha is not None and rank is not None else 1.0

    def _factor(self, name: str, device: torch.device) -> torch.Tensor:
        whole = self.tensors.get(f"lokr_{name}")
        if whole is not None:
            return whole.to(device, torch.float32)
        a = self.tensors[f"lokr_{name}_a"].to(device, torch.float32)
        return a @ self.tensors[f"lokr_{name}_b"].to(device, torch.float32).flatten(1)

    def updown(self, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu"
               ) -> torch.Tensor:
        """The unscaled update ``U`` in fp32 on ``device``, shaped ``shape`` (the weight's);
        ``ValueError`` if it does not have the weight's size."""
        device = torch.device(device)

        def get(key: str) -> torch.Tensor:
            return self.tensors[key].to(device, torch.float32).flatten(1)

        if self.layout == "lora":
            product = get("lora_up.weight") @ get("lora_down.weight")
        elif self.layout == "loha":
            product = (get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b"))
        else:
            w1, w2 = self._factor("w1", device), self._factor("w2", device)
            if w2.ndim == 4:
                w1 = w1[:, :, None, None]
            product = torch.kron(w1, w2.contiguous())
        if product.numel() != math.prod(shape):
            raise ValueError(
                f"a {tuple(product.shape)} update does not fit the weight {tuple(shape)}"
            )
        return product.reshape(shape)

    def delta(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """What this layer adds to ``weight`` at ``strength``: fp32, on the weight's device."""
        base = weight.detach().float()
        delta = self.scale * self.updown(base.shape, base.device)
        if self.dora_scale is not None:
            delta = decompose(delta, base, self.dora_scale.to(base.device, torch.float32))
        return strength * delta


def decompose(delta: torch.Tensor, weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: ``m * (W + delta) / ||W + delta|| - W``, the norm over each input column (``m``
    shaped ``[1, in, …]``) or each output row (``[out, 1, …]``); ``ValueError`` otherwise."""
    merged = weight + delta
    out, inputs = merged.shape[0], merged.shape[1]
    ones = [1] * (merged.ndim - 2)
    if magnitude.numel() == inputs and (magnitude.ndim < 2 or magnitude.shape[0] == 1):
        norm = merged.transpose(0, 1).reshape(inputs, -1).norm(dim=1)
        shape = (1, inputs, *ones)
    elif magnitude.numel() == out:
        norm = merged.reshape(out, -1).norm(dim=1)
        shape = (out, 1, *ones)
    else:
        raise ValueError(
            f"dora_scale {tuple(magnitude.shape)} fits neither the columns ([1, {inputs}, …]) "
            f"nor the rows ([{out}, 1, …]) of the weight {tuple(merged.shape)}"
        )
    return merged * (magnitude.reshape(shape) / norm.reshape(shape)) - weight


def _type_of(shapes: dict[str, tuple[int, ...]]) -> str:
    """The network type of a file's tensors, given as key -> shape: ``dora`` if any layer has
    magnitudes, else its layout, a LoRA with a k x k convolution being a ``locon``."""
    suffixes = {key.split(".", 1)[-1] for key in shapes}
    if "dora_scale" in suffixes:
        return "dora"
    for layout in ("loha", "lokr"):
        if suffixes & set(LAYOUTS[layout]):
            return layout
    conv = any(key.endswith(DOWN) and len(shape) == 4 and shape[2] * shape[3] > 1
               for key, shape in shapes.items())
    return "locon" if conv else "lora"


def network_type(layers: dict[str, LoraLayer]) -> str:
    """The type (:data:`harness.vocabulary.NETWORK_TYPES`) of a file read by :func:`read_lora`."""
    shapes = {f"{module}.{suffix}": tuple(tensor.shape)
              for module, layer in layers.items() for suffix, tensor in layer.tensors.items()}
    shapes.update({f"{module}{DORA}": tuple(layer.dora_scale.shape)
                   for module, layer in layers.items() if layer.dora_scale is not None})
    return _type_of(shapes)


def file_network_type(path: str | Path) -> str:
    """:func:`network_type` of a ``.safetensors`` file from its header (no tensor read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return _type_of({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})


@dataclass(frozen=True)
class LoraTarget:
    """Where a kohya module name lands in a model of a given spec."""

    #: ``unet``, ``text_encoder`` (or SDXL's ``text_encoder_2``).
    component: str
    #: The weight's key in the diffusers component state dict.
    diffusers_key: str
    #: The weight's key in the original single-file layout.
    original_key: str
    shape: tuple[int, ...]
    #: The rows of the original tensor that are this weight (OpenCLIP's fused q/k/v).
    rows: tuple[int, int] | None = None


def kohya_text_prefixes(encoders: int) -> tuple[str, ...]:
    """kohya's prefix of each of a model's ``encoders`` text encoders: :data:`TEXT_PREFIX` for
    one; ``lora_te1_``, ``lora_te2_`` for SDXL's two (``sdxl_train_network.py``)."""
    if encoders == 1:
        return (TEXT_PREFIX,)
    return tuple(f"lora_te{index + 1}_" for index in range(encoders))


def kohya_name(component: str, module: str, spec: ModelSpec | None = None,
               original: str | None = None) -> str:
    """The kohya module name of a diffusers module path (``text_model.`` added for CLIP).

    For SDXL (``spec``), kohya's sd-scripts train on sgm's UNet: its names are the original
    module paths (``original``: the file key, ``input_blocks_4_1_…``), and the text encoders
    are ``lora_te1_`` / ``lora_te2_``."""
    sdxl = spec is not None and spec.family == "sdxl"
    if component == "unet":
        if sdxl and original is not None:
            module = original.removeprefix(UNET_FILE_PREFIX).removesuffix(".weight")
        return UNET_PREFIX + module.replace(".", "_")
    if not module.startswith("text_model."):
        module = "text_model." + module
    prefix = TEXT_PREFIX
    if spec is not None:
        prefix = kohya_text_prefixes(len(spec.text_encoders))[spec.text_encoders.index(component)]
    return prefix + module.replace(".", "_")


@lru_cache(maxsize=8)
def _lora_targets(spec_json: str) -> dict[str, LoraTarget]:
    spec = ModelSpec.from_dict(json.loads(spec_json))
    targets: dict[str, LoraTarget] = {}
    for (component, key), slot in original_slots(spec).items():
        if component == "vae" or not key.endswith(".weight") or len(slot.shape) not in (2, 4):
            continue
        if slot.transposed:  # SDXL's pooled text_projection: not a layer kohya trains
            continue
        module = key[: -len(".weight")]
        targets[kohya_name(component, module, spec, slot.key)] = LoraTarget(
            component, key, slot.key, slot.shape, slot.rows
        )
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


def _split(size: int, factor: int) -> int:
    """LyCORIS' factorisation: the largest divisor of ``size`` that is at most ``factor``."""
    return max(d for d in range(1, min(size, factor) + 1) if size % d == 0)


def _layer_tensors(
    recipe: LoraRecipe, target: LoraTarget, tag: str
) -> dict[str, torch.Tensor]:
    """One module's tensors (fp32; suffixes as in the file) for a target weight."""
    rank, gain = recipe.rank, recipe.gain
    shape = target.shape
    out, kernel = shape[0], shape[2:]
    fan_in = math.prod(shape[1:])

    def draw(suffix: str, size: tuple[int, ...], std: float) -> torch.Tensor:
        return seeded_normal(size, 0.0, std, recipe.seed, f"{tag}.{suffix}")

    tensors: dict[str, torch.Tensor] = {}
    if recipe.layout == "lora":  # up @ down has std gain * sigma_W
        tensors["lora_down.weight"] = draw("lora_down.weight", (rank, *shape[1:]), fan_in**-0.5)
        up_shape = (out, rank, 1, 1) if kernel else (out, rank)
        tensors["lora_up.weight"] = draw("lora_up.weight", up_shape, gain / rank**0.5)
    elif recipe.layout == "loha":  # each product has std sqrt(gain * sigma_W)
        for pair in ("w1", "w2"):
            tensors[f"hada_{pair}_a"] = draw(f"hada_{pair}_a", (out, rank), rank**-0.5)
            tensors[f"hada_{pair}_b"] = draw(
                f"hada_{pair}_b", (rank, fan_in), (gain * fan_in**-0.5) ** 0.5
            )
    else:  # lokr: w1 whole ~ N(0, 1), w2 = w2_a @ w2_b with std gain * sigma_W
        rows, columns = _split(out, recipe.factor), _split(shape[1], recipe.factor)
        tensors["lokr_w1"] = draw("lokr_w1", (rows, columns), 1.0)
        tensors["lokr_w2_a"] = draw("lokr_w2_a", (out // rows, rank), rank**-0.5)
        width = shape[1] // columns * math.prod(kernel)
        tensors["lokr_w2_b"] = draw("lokr_w2_b", (rank, width), gain * fan_in**-0.5)
    if recipe.dora:  # near the columns' norms of W (std sigma_W over out * k * k entries)
        columns_norm = fan_in**-0.5 * (out * math.prod(kernel)) ** 0.5
        spread = draw("dora_scale", (1, shape[1], *[1] * len(kernel)), DORA_SPREAD)
        tensors["dora_scale"] = columns_norm * spread.exp()
    return tensors


def synthesize_lora(spec: ModelSpec, name: str) -> dict[str, torch.Tensor]:
    """The tensors of the zoo LoRA ``name`` for ``spec`` (fp16 weights, fp32 alphas).

    Every tensor draws from its own generator seeded by (recipe seed, spec name and seed,
    tensor name). Whatever the layout, the update ``U`` has std ``gain * σ_W``, where
    ``σ_W = 1/sqrt(fan_in)`` is the synthetic weight's std: a LoRA's ``down ~ N(0, 1/fan_in)``
    and ``up ~ N(0, gain² / rank)``; a LoHa's two products each ``sqrt(gain * σ_W)``; a LoKr's
    whole ``lokr_w1 ~ N(0, 1)`` and ``lokr_w2_a @ lokr_w2_b`` ``gain * σ_W``. A DoRA's
    magnitudes are the columns' expected norms times ``exp(N(0, DORA_SPREAD²))``.
    """
    recipe = LORAS[name]
    targets = lora_targets(spec)
    chosen = _modules(targets, "unet", recipe.unet)
    for component in spec.text_encoders:
        chosen += _modules(targets, component, recipe.text_encoder)
    if not chosen:
        raise ValueError(f"LoRA {name!r} adapts no module of spec {spec.name!r}")
    tensors: dict[str, torch.Tensor] = {}
    for module, target in chosen:
        tag = f"{spec.name}:{spec.seed}/lora/{name}/{module}"
        for suffix, value in _layer_tensors(recipe, target, tag).items():
            tensors[f"{module}.{suffix}"] = value.to(torch.float16)
        tensors[module + ALPHA] = torch.tensor(recipe.alpha, dtype=torch.float32)
    return tensors


def _metadata(recipe: LoraRecipe, name: str, spec: ModelSpec) -> dict[str, str]:
    """What kohya's sd-scripts (plain LoRA) or LyCORIS (the rest) writes, and the zoo's tag."""
    metadata = {
        "ss_network_dim": str(recipe.rank),
        "ss_network_alpha": str(recipe.alpha),
        "ss_base_model_version": BASE_MODEL_VERSIONS[spec.family],
        "sdbench_extra": json.dumps({"kind": "lora", "name": name, "spec": spec.name}),
    }
    if recipe.layout == "lora" and not recipe.dora and _RESNET_CONV not in recipe.unet:
        return {**metadata, "ss_network_module": "networks.lora"}
    algo = "locon" if recipe.layout == "lora" else recipe.layout
    args = {"algo": algo, "conv_dim": str(recipe.rank), "conv_alpha": str(recipe.alpha)}
    if recipe.layout == "lokr":
        args["factor"] = str(recipe.factor)
    if recipe.dora:
        args["dora_wd"] = "True"
    return {**metadata, "ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}


def write_lora(spec: ModelSpec, name: str, path: Path) -> Path:
    """Write the zoo LoRA ``name`` for ``spec`` to ``path`` (``.safetensors``)."""
    from safetensors.torch import save

    metadata = _metadata(LORAS[name], name, spec)
    path.write_bytes(sorted_header(save(synthesize_lora(spec, name), metadata=metadata)))
    return path


def sorted_header(data: bytes) -> bytes:
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


def _layer(module: str, parts: dict[str, torch.Tensor]) -> LoraLayer | str:
    """One module's :class:`LoraLayer`, or what is wrong with its keys or shapes."""
    own = {key: value for key, value in parts.items() if key not in SHARED_KEYS}
    layouts = [name for name, keys in LAYOUTS.items() if set(own) & set(keys)]
    if len(layouts) != 1:
        return f"{module}: keys of {len(layouts) or 'no'} layouts ({', '.join(sorted(own))})"
    layout = layouts[0]
    if layout == "lokr":
        complete = all(f"lokr_{w}" in own or {f"lokr_{w}_a", f"lokr_{w}_b"} <= set(own)
                       for w in ("w1", "w2"))
    else:
        complete = set(LAYOUTS[layout]) <= set(own)
    if not complete:
        missing = [key for key in LAYOUTS[layout] if key not in own]
        return f"{module}: unpaired ({', '.join(sorted(own))}; missing {', '.join(missing)})"
    if layout == "lora":
        down, up = own["lora_down.weight"], own["lora_up.weight"]
        fits = down.ndim in (2, 4) and up.ndim == down.ndim and up.shape[1] == down.shape[0]
        if not fits or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
            return (f"{module}: lora_up {tuple(up.shape)} does not fit lora_down "
                    f"{tuple(down.shape)} (expected [out, rank(, 1, 1)] @ [rank, in(, k, k)])")
    alpha = float(parts["alpha"]) if "alpha" in parts else None
    return LoraLayer(layout=layout, tensors=own, alpha=alpha, dora_scale=parts.get("dora_scale"))


def read_lora(path: str | Path) -> dict[str, LoraLayer]:
    """kohya module name → :class:`LoraLayer` of a kohya / LyCORIS ``.safetensors`` file.

    A missing ``.alpha`` means a scale of 1 (kohya's ``alpha = rank``). Raises
    :class:`UserError` naming the file for a file that cannot be read or holds no network
    layer, for a key of a layout not applied here (:data:`NOT_APPLIED`, named with what it
    is), and for unknown, unpaired or mis-shaped keys.
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
    known = {key for keys in LAYOUTS.values() for key in keys} | set(SHARED_KEYS)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    not_applied: list[str] = []
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        if suffix in NOT_APPLIED:
            not_applied.append(f"{key} ({NOT_APPLIED[suffix]})")
        elif suffix in known:
            parts.setdefault(module, {})[suffix] = value
        else:
            unknown.append(key)
    if not_applied:
        raise UserError(
            f"LoRA '{path}': keys of a layout sdbench does not apply: {_few(sorted(not_applied))}"
        )
    if not any(set(p) - set(SHARED_KEYS) for p in parts.values()):
        raise UserError(
            f"LoRA '{path}': no network layers (keys: {_few(sorted(tensors))}); expected a "
            "kohya / LyCORIS file (lora_down/lora_up, hada_*, lokr_*)"
        )
    if unknown:
        raise UserError(
            f"LoRA '{path}': unknown keys: {_few(sorted(unknown))}; expected <module>."
            "lora_down.weight / lora_up.weight, hada_w1_a…, lokr_w1…, alpha, dora_scale"
        )
    layers = {module: _layer(module, own) for module, own in parts.items()}
    bad = sorted(problem for problem in layers.values() if isinstance(problem, str))
    if bad:
        raise UserError(
            f"LoRA '{path}': {len(bad)} malformed layers: {_few(bad, 3)}; a layer holds "
            "lora_down + lora_up, hada_w1_a/b + hada_w2_a/b, or lokr_w1 + lokr_w2 (whole or "
            "as _a/_b)"
        )
    return {module: layer for module, layer in layers.items() if isinstance(layer, LoraLayer)}


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
    becomes ``W + Σ delta`` (computed in fp32 on the diffusers state dicts, then converted
    to the original layout with the zoo's key mapping). The file
    at ``out`` has the format of ``source`` (``.safetensors`` for a hub folder) and carries
    the spec metadata, so :func:`models.resolve` recognises it. A LoRA key that names no
    module of the model (or has the wrong shape) raises :class:`UserError` listing a few.
    Each file's delta (:meth:`LoraLayer.delta`, DoRA included) is computed from the base
    weight and the deltas summed, as the original backend applies several files.
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
    states = {c: {k: v.float() for k, v in s.items()} for c, s in states.items()}
    deltas: dict[tuple[str, str], torch.Tensor] = {}
    for file, strength in loras:
        layers = read_lora(file)
        unknown = sorted(module for module in layers if module not in targets)
        if unknown:
            raise UserError(
                f"LoRA '{file}': {len(unknown)} keys name no module of {spec.name}: {_few(unknown)}"
            )
        for module, layer in layers.items():
            target = targets[module]
            where = (target.component, target.diffusers_key)
            try:  # every file's delta from the base weight, as the original backend adds them
                delta = layer.delta(states[target.component][target.diffusers_key], strength)
            except ValueError as error:
                raise UserError(f"LoRA '{file}': {module}: {error}") from None
            deltas[where] = deltas[where] + delta if where in deltas else delta
    for (component, key), delta in deltas.items():
        states[component][key] = states[component][key] + delta

    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.partial{out.suffix}")
    try:
        save_single_file(to_original_state_dict(spec, states), spec, temporary)
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return out
