"""The zoo's extra files per architecture: LoRAs, textual-inversion embeddings, ControlNets.

:func:`extra_file` returns a cached file for a scenario's model reference. The files are
synthesised for the architecture's *base* spec (:func:`models.specs.base_spec`: an inpainting
variant uses the files of its base, which has the same module names and widths), so
``tiny`` and ``tiny-inpaint`` get byte-identical files. They are cached under the model's
zoo folder, ``<zoo dir>/extras-v<EXTRAS_VERSION>/<kind>/<file>``, and written atomically.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import UserError

from .controlnet import (
    CONTROLNETS,
    write_controlnet_config,
    write_controlnet_file,
    write_controlnet_folder,
)
from .embeddings import EMBEDDINGS, embedding_file_name, write_embedding
from .lora import LORAS, write_lora
from .specs import SPECS, ModelSpec, base_spec
from .zoo import _atomic_create, cache_root

#: Bumped whenever a recipe or the synthesis of extras changes the written bytes.
EXTRAS_VERSION = 1
KINDS = ("lora", "embedding", "controlnet")
#: The layouts of a zoo ControlNet: the original single file and the diffusers folder.
CONTROLNET_LAYOUTS = ("safetensors", "folder")


def extra_names(kind: str) -> list[str]:
    """The names of the zoo's extras of ``kind`` (``lora`` | ``embedding``)."""
    if kind == "lora":
        return list(LORAS)
    if kind == "embedding":
        return list(EMBEDDINGS)
    if kind == "controlnet":
        return list(CONTROLNETS)
    raise UserError(f"unknown extra kind {kind!r}; expected one of: {', '.join(KINDS)}")


def model_spec(model: str) -> ModelSpec:
    """The spec of a scenario's model reference: a zoo name, a single file or hub folder of a
    recognised architecture, or ``hub:ORG/NAME``. Raises :class:`UserError` otherwise."""
    if model in SPECS:
        return SPECS[model]
    from .sources import HUB_SCHEME, resolve, single_file_spec

    path = Path(model).expanduser()
    if not model.startswith(HUB_SCHEME) and path.is_file():
        return single_file_spec(path)
    resolved = resolve(model, "hub")
    if resolved.spec_name is None:
        raise UserError(
            f"model {model!r}: unrecognised architecture; expected one of the zoo's "
            f"({', '.join(SPECS)})"
        )
    return SPECS[resolved.spec_name]


def _extras_folder(model: str, kind: str) -> tuple[ModelSpec, Path]:
    spec = model_spec(model)
    folder = cache_root() / "zoo" / f"{spec.name}-{spec.fingerprint()}"
    return base_spec(spec), folder / f"extras-v{EXTRAS_VERSION}" / kind


def extra_file(kind: str, name: str, model: str, layout: str = "safetensors") -> Path:
    """The cached zoo extra ``name`` of ``kind`` for ``model``'s architecture.

    ``kind`` is ``lora`` (a kohya ``<name>.safetensors``), ``embedding`` (A1111
    ``<name>.pt`` or ``<name>.safetensors``; the trigger word is ``name``) or ``controlnet``
    (``layout`` ``safetensors``: the original single file ``<name>.safetensors``; ``folder``:
    the diffusers ``ControlNetModel`` folder ``<name>/``). Synthesised on first use,
    deterministically. Unknown names raise :class:`UserError` listing the known.
    """
    names = extra_names(kind)
    if name not in names:
        raise UserError(f"unknown {kind} {name!r}; expected one of: {', '.join(names)}")
    base, folder = _extras_folder(model, kind)
    if kind == "controlnet":
        if layout not in CONTROLNET_LAYOUTS:
            raise UserError(
                f"controlnet layout {layout!r}; expected one of: {', '.join(CONTROLNET_LAYOUTS)}"
            )
        if layout == "folder":
            target = folder / name
            write = write_controlnet_folder
        else:
            target = folder / f"{name}.safetensors"
            write = write_controlnet_file
        if target.exists():
            return target
        return _atomic_create(target, lambda path: write(base, name, path))
    if kind == "lora":
        target = folder / f"{name}.safetensors"
        if target.exists():
            return target
        return _atomic_create(target, lambda path: write_lora(base, name, path))
    target = folder / embedding_file_name(name, base)
    if target.exists():
        return target
    return _atomic_create(target, lambda path: write_embedding(base, name, path))


def controlnet_config_folder(model: str) -> Path:
    """A folder with the ``config.json`` of a ControlNet for ``model``'s architecture (what
    diffusers' ``ControlNetModel.from_single_file`` needs offline)."""
    base, folder = _extras_folder(model, "controlnet")
    target = folder / "config"
    if target.exists():
        return target
    return _atomic_create(target, lambda path: write_controlnet_config(base, path))
