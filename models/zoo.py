"""The on-disk zoo: synthesised models cached per spec fingerprint, in every load format.

A zoo model lives under ``<cache_root()>/zoo/<name>-<spec fingerprint>/``, so changing a
spec (or :data:`~models.specs.ZOO_FORMAT_VERSION`) invalidates it. In that folder:

- ``hub/``: the diffusers folder layout;
- ``<name>.safetensors`` / ``<name>.ckpt``: the original single-file layout;
- ``config/``: configs and tokenizer only, no weights (for ``from_single_file(config=...)``).

Every entry is written to a temporary name in the same folder and renamed into place, so a
run killed mid-write leaves no half model behind. :func:`install_in_hf_cache` additionally
places a model in a local Hugging Face hub cache as ``spec.repo_id`` so hub resolution runs
offline.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from harness.errors import UserError

from .convert import write_config_folder, write_hub_folder, write_single_file
from .specs import SPECS, ModelSpec
from .staged import STAGED_SPECS, StagedSpec, write_staged_hub
from .staged import parameter_counts as staged_parameter_counts
from .synth import empty_components, parameter_counts

FORMATS = ("hub", "safetensors", "ckpt")


def cache_root() -> Path:
    """``$SDBENCH_CACHE`` or ``~/.cache/sdbench`` (read on every call)."""
    root = os.environ.get("SDBENCH_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sdbench"


def zoo_names() -> list[str]:
    """Every zoo model: the SD-shaped ones, then the multi-stage ones."""
    return [*SPECS, *STAGED_SPECS]


def zoo_spec(name: str) -> ModelSpec:
    """The spec of SD-shaped zoo model ``name``; a :class:`UserError` names the known ones."""
    if name in STAGED_SPECS:
        raise UserError(f"zoo model {name!r} is a multi-stage model ({STAGED_SPECS[name].family})"
                        "; expected an SD-shaped one here")
    try:
        return SPECS[name]
    except KeyError:
        raise UserError(
            f"unknown zoo model {name!r}; expected one of: {', '.join(zoo_names())}"
        ) from None


def zoo_model(name: str) -> ModelSpec | StagedSpec:
    """The spec of zoo model ``name``, SD-shaped or multi-stage."""
    if name in STAGED_SPECS:
        return STAGED_SPECS[name]
    return zoo_spec(name)


def model_dir(name: str) -> Path:
    """The cache folder of zoo model ``name`` at its current spec fingerprint."""
    spec = zoo_model(name)
    return cache_root() / "zoo" / f"{name}-{spec.fingerprint()}"


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown model format {fmt!r}; expected one of: {', '.join(FORMATS)}")


def _entry_name(name: str, fmt: str) -> str:
    return "hub" if fmt == "hub" else f"{name}.{fmt}"


def _atomic_create(target: Path, build: Callable[[Path], Any]) -> Path:
    """Run ``build(tmp)`` on a temporary path next to ``target``, then rename it into place.

    If another process created ``target`` meanwhile, its result is kept and ours discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        temporary = staging / target.name
        build(temporary)
        try:
            os.rename(temporary, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def cached_formats(name: str) -> list[str]:
    """The formats of zoo model ``name`` already in the cache."""
    folder = model_dir(name)
    return [fmt for fmt in FORMATS if (folder / _entry_name(name, fmt)).exists()]


def materialize(name: str, fmt: str = "hub") -> Path:
    """The cached path of zoo model ``name`` in format ``fmt`` (hub | safetensors | ckpt).

    Synthesises and writes it on first use; later calls return the cached path untouched.
    """
    return materialize_formats(name, (fmt,))[fmt]


def materialize_formats(name: str, formats: Iterable[str]) -> dict[str, Path]:
    """The cached paths of zoo model ``name`` in each of ``formats``, as :func:`materialize`.

    The hub folder is streamed from the seeded draws a tensor at a time; a single file is
    converted from the (cached) hub folder's memory-mapped tensors, so even the full-size SDXL
    is written holding about one tensor in memory, and every format has the same weights."""
    formats = tuple(formats)
    for fmt in formats:
        _check_format(fmt)
    if name in STAGED_SPECS:
        return {fmt: _materialize_staged(STAGED_SPECS[name], fmt) for fmt in formats}
    spec = zoo_spec(name)
    targets = {fmt: model_dir(name) / _entry_name(name, fmt) for fmt in formats}

    def build(path: Path, fmt: str) -> None:
        if fmt == "hub":
            write_hub_folder(spec, path)
        else:  # converted from the cached hub folder's memory-mapped tensors
            write_single_file(spec, materialize(name, "hub"), path)

    for fmt, target in targets.items():
        if not target.exists():
            _atomic_create(target, functools.partial(build, fmt=fmt))
    return targets


def no_single_file(spec: StagedSpec) -> str:
    """Why a multi-stage model has no single file (the error a user meets)."""
    return (f"{spec.name} ({spec.family}) has no original single-file layout: its releases are "
            "diffusers folders only (one per stage); expected source hub")


def _materialize_staged(spec: StagedSpec, fmt: str) -> Path:
    if fmt != "hub":
        raise UserError(f"model {spec.name!r}: {no_single_file(spec)}")
    target = model_dir(spec.name) / "hub"
    if not target.exists():
        _atomic_create(target, lambda path: write_staged_hub(spec, path))
    return target


def config_folder(spec_name: str | ModelSpec) -> Path:
    """A cached hub-layout folder with configs and tokenizer of a spec, no weights.

    ``spec_name`` is a zoo name or a :class:`ModelSpec` (e.g. one read from a file's
    metadata, which may predate the current zoo spec of that name).
    """
    spec = zoo_spec(spec_name) if isinstance(spec_name, str) else spec_name
    target = cache_root() / "zoo" / f"{spec.name}-{spec.fingerprint()}" / "config"
    if target.exists():
        return target
    return _atomic_create(target, lambda path: write_config_folder(spec, path))


def write_model(name: str, fmt: str, out: Path) -> Path:
    """Write zoo model ``name`` in format ``fmt`` to the user path ``out``; returns the path.

    For ``hub``, ``out`` is the folder to create (it must not exist or be empty). For a single
    file, ``out`` is the file (suffix ``.safetensors`` / ``.ckpt`` as ``fmt``) or an existing
    folder, in which ``<name>.<fmt>`` is written.
    """
    _check_format(fmt)
    source = materialize(name, fmt)
    out = Path(out).expanduser()
    if fmt == "hub":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(
                f"output '{out}': exists and is not an empty folder; expected a new folder"
            )
        shutil.copytree(source, out, dirs_exist_ok=True)
        return out
    if out.is_dir():
        out = out / source.name
    elif out.suffix.lower() != f".{fmt}":
        raise UserError(f"output '{out}': expected a folder or a file name ending in .{fmt}")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out)
    return out


def list_models() -> list[dict[str, Any]]:
    """One record per zoo model: name, description, parameter counts, fingerprint, cache."""
    records = []
    for name in zoo_names():
        spec = zoo_model(name)
        if isinstance(spec, StagedSpec):
            counts = staged_parameter_counts(spec)
        else:
            counts = parameter_counts(empty_components(spec))
        records.append(
            {
                "name": name,
                "description": spec.description,
                "parameters": counts,
                "total_parameters": sum(counts.values()),
                "fingerprint": spec.fingerprint(),
                "repo_id": spec.repo_id,
                "cached_formats": cached_formats(name),
            }
        )
    return records


# --------------------------------------------------------------------------- HF hub cache


def hf_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$HF_HUB_CACHE`` (read now), else huggingface_hub's default."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE).expanduser()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _place_blob(source: Path, blobs: Path, link: Path) -> None:
    """Store ``source`` as a content-addressed blob and point the snapshot ``link`` at it."""
    blob = blobs / _file_sha256(source)
    if not blob.exists():
        temporary = blobs / f".{blob.name}.incomplete"
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)
        os.replace(temporary, blob)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        return
    try:
        link.symlink_to(os.path.relpath(blob, link.parent))
    except OSError:
        shutil.copyfile(blob, link)


def install_in_hf_cache(
    name: str, cache_dir: str | Path | None = None, formats: Iterable[str] = ("hub",)
) -> str:
    """Place zoo model ``name`` in a local Hugging Face hub cache as ``spec.repo_id``.

    Uses the standard ``models--org--name/{blobs,snapshots/<commit>,refs/main}`` layout, so
    ``snapshot_download(repo_id, local_files_only=True)`` and
    ``DiffusionPipeline.from_pretrained(repo_id, local_files_only=True)`` resolve it offline.
    ``formats`` picks what the repo holds: ``hub`` (the diffusers folders at the root) and/or
    the single files ``<name>.safetensors`` / ``<name>.ckpt`` at the repo root. Installing
    again adds missing files only. Returns the repo id.
    """
    if name in STAGED_SPECS:  # one repository per stage, as the releases are published
        staged = STAGED_SPECS[name]
        for fmt in formats:
            _materialize_staged(staged, fmt)  # a single file: the error saying there is none
        hub = _materialize_staged(staged, "hub")
        for stage in staged.stages:
            _install_repo(hf_cache_dir(cache_dir), staged.stage_repo(stage), staged,
                          [hub / stage.name])
        return staged.repo_id
    spec = zoo_spec(name)
    for fmt in formats:
        _check_format(fmt)
    _install_repo(hf_cache_dir(cache_dir), spec.repo_id, spec,
                  [materialize(name, fmt) for fmt in formats])
    return spec.repo_id


def _install_repo(cache: Path, repo_id: str, spec: ModelSpec | StagedSpec,
                  sources: list[Path]) -> None:
    """Place ``sources`` (folders' contents at the root, files by name) in the cache's repo."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"sdbench-zoo/{repo_id}/{spec.fingerprint()}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for source in sources:
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for file in files:
            relative = file.relative_to(source) if source.is_dir() else Path(file.name)
            _place_blob(file, blobs, snapshot / relative)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
