"""LoRA on the original backend, with the semantics of A1111's built-in Lora extension.

**Files** (parsed by :func:`models.read_lora`): kohya / LyCORIS ``.safetensors`` with, per
patched layer, the tensors of one network type — LoRA / LoCon ``<name>.lora_down.weight``
(``[rank, in]`` or ``[rank, in, kh, kw]``) and ``<name>.lora_up.weight`` (``[out, rank]`` or
``[out, rank, 1, 1]``), LoHa ``hada_w1_a/b`` and ``hada_w2_a/b``, LoKr ``lokr_w1`` /
``lokr_w2`` (or their ``_a`` / ``_b`` factors) — optionally ``<name>.alpha`` (scalar; default
``rank``) and DoRA magnitudes ``<name>.dora_scale``. ``<name>`` is ``lora_unet_`` + a UNet module
path with ``.`` written ``_``, in diffusers' naming
(``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``, what kohya's sd-scripts
writes) or in the LDM naming (``input_blocks_1_1_proj_in``), or ``lora_te_`` + a CLIP module
path (``text_model_encoder_layers_0_self_attn_q_proj``).

**Names**: :func:`layer_names` lists, for every ``Linear`` / ``Conv2d`` of the UNet and the
text encoder, every kohya name that designates it. The diffusers name of an LDM module is
found by running :func:`models.convert.unet_prefix_map` (diffusers -> original names, the map
the zoo writes single files with) backwards, so the two namings cannot drift apart.

**Patching** (:class:`LoraPatcher`): ``W += delta``, each type's delta as
:meth:`models.LoraLayer.delta` defines it (``strength * (alpha / rank) * up @ down`` for a
LoRA; the Hadamard and Kronecker products, and DoRA's decomposition, as A1111 computes them),
in float32 on the weight's device from the base weight, and added once per layer (the deltas
of several files summed first), so two LoRAs at (a, b) equal one file holding both. Before
the first patch of a layer its weight is copied to the CPU; when the requested set of
(file, strength) changes, every patched layer is restored from that copy exactly, then the
new set applied. Zero strengths are skipped, so a LoRA at strength 0 leaves the model
bit-identical. A key that names no layer, a shape that does not fit, a key of a layout not
applied here (CP/Tucker factors, OFT, IA3…) or a file that is not a LoRA fails the request
with a :class:`~harness.errors.UserError` naming the file and a few keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from harness.errors import UserError

if TYPE_CHECKING:
    from models import LoraLayer

UNET_PREFIX = "lora_unet_"


# --- names ---------------------------------------------------------------------------------


def _diffusers_unet_config(unet: nn.Module) -> dict[str, object]:
    """The fields of a diffusers UNet config that :func:`unet_prefix_map` reads, derived from
    the LDM :class:`~.unet.UNetConfig` (attention at level ``l`` iff ``2**l`` is listed)."""
    config = unet.config  # type: ignore[attr-defined]
    levels = len(config.channel_mult)
    attention = [2**level in config.attention_resolutions for level in range(levels)]
    return {
        "block_out_channels": [config.model_channels * m for m in config.channel_mult],
        "layers_per_block": config.num_res_blocks,
        "up_block_types": [
            "CrossAttnUpBlock2D" if attention[levels - 1 - level] else "UpBlock2D"
            for level in range(levels)
        ],
    }


def unet_diffusers_names(unet: nn.Module) -> dict[str, str]:
    """LDM module path -> diffusers module path, for the UNet's Linear and Conv2d layers."""
    from models.convert import unet_prefix_map

    entries = sorted(unet_prefix_map(_diffusers_unet_config(unet)), key=lambda e: -len(e[1]))
    names = {}
    for path, module in unet.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        for hf_prefix, ldm_prefix, renames in entries:
            if path != ldm_prefix and not path.startswith(ldm_prefix + "."):
                continue
            rest = path[len(ldm_prefix) + 1 :]
            for hf_name, ldm_name in renames.items():
                if rest == ldm_name or rest.startswith(ldm_name + "."):
                    rest = hf_name + rest[len(ldm_name) :]
                    break
            names[path] = f"{hf_prefix}.{rest}" if rest else hf_prefix
            break
    return names


class ProjectionRows:
    """q, k or v of a ``MultiheadAttention`` (OpenCLIP's ``attn``): its rows of the fused
    ``in_proj_weight``, as a layer whose ``weight`` a LoRA patches (A1111 patches the three
    slices of an ``in_proj`` the same way). The view is taken on every access, so it follows
    the parameter across device moves."""

    def __init__(self, attention: nn.MultiheadAttention, index: int) -> None:
        self.attention = attention
        self.index = index

    @property
    def weight(self) -> torch.Tensor:
        width = self.attention.embed_dim
        return self.attention.in_proj_weight[self.index * width : (self.index + 1) * width]


#: kohya's CLIP names of an OpenCLIP resblock's layers (``lora_te_text_model_encoder_layers_N_``
#: + name), as SD 2.x LoRAs are trained on diffusers' ``CLIPTextModel``.
_OPENCLIP_KOHYA = {"self_attn_out_proj": "attn.out_proj", "mlp_fc1": "mlp.c_fc",
                   "mlp_fc2": "mlp.c_proj"}


def _openclip_layer_names(text: nn.Module, prefix: str) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for index, block in enumerate(text.transformer.resblocks):
        base = f"{prefix}text_model_encoder_layers_{index}_"
        for slot, projection in enumerate("qkv"):
            table[f"{base}self_attn_{projection}_proj"] = ProjectionRows(block.attn, slot)
        for name, path in _OPENCLIP_KOHYA.items():
            table[base + name] = block.get_submodule(path)
    return table


def layer_names(unet: nn.Module, text_encoders: list[nn.Module]) -> dict[str, Any]:
    """Every kohya layer name (without ``.lora_*`` suffix) -> the layer it patches (a module
    with a ``weight``, or a :class:`ProjectionRows`). ``text_encoders``: the text models
    (SDXL's CLIP ViT-L and OpenCLIP bigG, named ``lora_te1_`` / ``lora_te2_``)."""
    from models.lora import kohya_text_prefixes

    table: dict[str, Any] = {}
    diffusers_names = unet_diffusers_names(unet)
    for path, module in unet.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            table[UNET_PREFIX + path.replace(".", "_")] = module
            if path in diffusers_names:
                table[UNET_PREFIX + diffusers_names[path].replace(".", "_")] = module
    for prefix, text in zip(kohya_text_prefixes(len(text_encoders)), text_encoders, strict=True):
        if hasattr(text, "positional_embedding"):  # OpenCLIP's text tower (SD 2.x, SDXL)
            table.update(_openclip_layer_names(text, prefix))
            continue
        flat = not hasattr(text, "text_model")  # transformers >= 5.6
        for path, module in text.named_modules():
            if isinstance(module, nn.Linear):
                full = f"text_model.{path}" if flat else path
                table[prefix + full.replace(".", "_")] = module
    return table


# --- patching ------------------------------------------------------------------------------


class LoraPatcher:
    """Applies a set of (file, strength) to a model's weights and restores them exactly."""

    def __init__(self, layers: dict[str, Any]) -> None:
        self.layers = layers
        self.applied: tuple[tuple[Path, float], ...] = ()
        self._backup: dict[Any, torch.Tensor] = {}
        self._files: dict[Path, dict[str, LoraLayer]] = {}

    def _read(self, path: Path) -> dict[str, LoraLayer]:
        from models import read_lora

        if path not in self._files:
            layers = read_lora(path)
            unknown = sorted(set(layers) - set(self.layers))
            if unknown:
                more = f", ... ({len(unknown) - 3} more)" if len(unknown) > 3 else ""
                raise UserError(
                    f"LoRA {path}: {len(unknown)} of {len(layers)} keys name no layer of this "
                    f"model: {', '.join(unknown[:3])}{more}"
                )
            self._files[path] = layers
        return self._files[path]

    @torch.no_grad()
    def apply(self, loras: Iterable[tuple[Path, float]]) -> None:
        """Make the weights those of the base model plus ``loras`` (a no-op if unchanged)."""
        wanted = tuple((Path(path), float(strength)) for path, strength in loras)
        if wanted == self.applied:
            return
        files = [(path, self._read(path), strength) for path, strength in wanted]
        self.restore()
        deltas: dict[Any, torch.Tensor] = {}
        for path, layers, strength in files:
            if strength == 0.0:
                continue
            for name, layer in layers.items():
                module = self.layers[name]
                try:
                    delta = layer.delta(module.weight, strength)
                except ValueError as error:
                    raise UserError(f"LoRA {path}: {name}: {error}") from None
                deltas[module] = deltas[module] + delta if module in deltas else delta
        for module, delta in deltas.items():
            weight = module.weight
            self._backup[module] = weight.detach().to("cpu", copy=True)
            weight.copy_((weight.float() + delta).to(weight.dtype))
        self.applied = wanted

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the original weights of every patched layer, bit for bit."""
        for module, original in self._backup.items():
            module.weight.copy_(original.to(module.weight.device))
        self._backup.clear()
        self.applied = ()
