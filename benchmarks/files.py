"""The single files the benchmarks load: the zoo's own, and one as people download them.

- ``zoo``: the zoo's ``.safetensors`` (fp32, with the ``sdbench_spec`` metadata);
- ``community``: the same weights stored in fp16, without sdbench metadata and with CLIP's
  ``position_ids`` buffer, as most downloaded SD 1.x single files are. sdbench recognises its
  architecture from the keys and shapes (:func:`models.sources.resolve`).
"""

from __future__ import annotations

from pathlib import Path

FILES: dict[str, str] = {
    "zoo": "the zoo's fp32 .safetensors, with sdbench metadata",
    "community": "the zoo's weights in fp16, no sdbench metadata (a downloaded file)",
}


def model_file(model: str, kind: str) -> Path:
    """The ``kind`` single file of zoo ``model`` (written once into the zoo cache)."""
    from models import resolve
    from models.zoo import cache_root

    zoo = resolve(model, "safetensors").path
    if kind == "zoo":
        return zoo
    if kind != "community":
        raise ValueError(f"file kind must be one of {sorted(FILES)}, got {kind!r}")
    target = cache_root() / "community" / f"{model}-fp16.safetensors"
    if target.is_file() and target.stat().st_mtime >= zoo.stat().st_mtime:
        return target
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(zoo), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open has no iterator
            tensor = handle.get_tensor(key)
            tensors[key] = tensor.half() if tensor.is_floating_point() else tensor
    positions = next(k for k in tensors if k.endswith("position_embedding.weight"))
    tensors[positions.replace("position_embedding.weight", "position_ids")] = torch.arange(
        tensors[positions].shape[0]
    )[None]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    save_file(tensors, str(partial))  # no metadata
    partial.replace(target)
    return target
