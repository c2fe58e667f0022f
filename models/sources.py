"""Resolution of model references to files on disk.

A scenario's ``model`` is one of:

- a zoo name (``tiny``, ``sd15``): synthesised on first use and cached; ``source`` picks the
  format (``hub`` folder, ``safetensors`` or ``ckpt`` single file);
- a local path: a hub-layout folder (``model_index.json``) or a single ``.safetensors`` /
  ``.ckpt`` file;
- ``hub:ORG/NAME``: resolved through huggingface_hub (offline from its cache when
  ``HF_HUB_OFFLINE=1`` or no network; ``hub:sdbench/<zoo name>`` is placed in the local cache
  by the zoo first).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UserError

from .convert import UNET_PREFIX, read_shapes, read_spec_metadata, single_file_format
from .specs import PREDICTION_TYPES, SPECS, ModelSpec, get_spec
from .staged import OPTIONAL_STAGE, STAGED_SPECS, read_stages
from .zoo import (
    config_folder,
    hf_cache_dir,
    install_in_hf_cache,
    materialize,
    no_single_file,
    zoo_names,
)


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved to local files."""

    #: As written in the scenario.
    reference: str
    #: ``hub`` (a folder in the diffusers layout) or ``safetensors`` / ``ckpt`` (single file).
    source: str
    #: The hub folder or the single file.
    path: Path
    #: The zoo architecture (``tiny``, ``sd15``) when known, from the zoo or file metadata.
    spec_name: str | None
    #: A hub-layout folder of the same architecture (component configs and tokenizer, weights
    #: optional): what ``from_single_file(config=...)`` needs offline.
    config_dir: Path | None
    #: What the UNet predicts when it is not what the model's own config says (``eps`` /
    #: ``v``: the scenario's ``prediction`` axis, or A1111's test on an SD 2.x file without
    #: sdbench metadata); ``None``: as the config (the spec, the scheduler config) says. Every
    #: backend honours it.
    prediction: str | None = None
    #: For a ``hub:`` reference: whether its files were in the Hugging Face cache already
    #: (``False``: downloaded by this resolution, before any clock starts); ``None`` otherwise.
    from_cache: bool | None = None
    #: A multi-stage model (:mod:`models.staged`): each stage's pipeline folder, in running
    #: order; ``None`` for an SD-shaped model.
    stages: dict[str, Path] | None = None
    #: The family of a multi-stage model (:data:`models.staged.STAGED_FAMILIES`).
    family: str | None = None

    @property
    def is_single_file(self) -> bool:
        return self.source in ("safetensors", "ckpt")


# --------------------------------------------------------------------------- resolution

SOURCES = ("hub", "safetensors", "ckpt")
HUB_SCHEME = "hub:"
_UNET_IN = UNET_PREFIX + "input_blocks.0.0.weight"
#: The first cross-attention of the UNet's input blocks: its key projection is [_, context].
_UNET_CONTEXT = re.compile(
    re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.1\.transformer_blocks\.0\.attn2\.to_k\.weight"
)
#: (UNet width, context width) of an original single file of a third-party release -> its
#: zoo architecture. SD 2.x files read as the 768-v release's architecture (``sd21``); the
#: 512 px base (eps) has the same shapes, so what the UNet predicts is A1111's test's answer
#: (:func:`a1111_prediction`). SDXL base's context is CLIP ViT-L's 768 + OpenCLIP bigG's 1280.
_KNOWN_SHAPES = {(320, 768): "sd15", (320, 1024): "sd21", (320, 2048): "sdxl"}
#: What each known architecture is, for the error naming what a file is not.
_KNOWN_NAMES = (
    "SD 1.x (UNet width 320, context 768), SD 2.x (context 1024) or SDXL base (context 2048)"
)
# Files of a hub folder worth fetching (weights of the diffusers layout, configs, tokenizer).
_HUB_IGNORE = ["*.msgpack", "*.onnx", "*.onnx_data", "*.h5", "*.ot", "*.ckpt", "*.pb"]


def resolve(
    reference: str, source: str, prediction: str = "auto", optional_stages: bool = False
) -> ResolvedModel:
    """Resolve a scenario's ``model`` reference in the format ``source`` to local files.

    ``prediction`` (the scenario axis): ``eps`` / ``v`` declare what the UNet predicts;
    ``auto`` keeps the model's own config, except for an SD 2.x single file without sdbench
    metadata, whose 512 px base (eps) and 768-v releases have the same shapes: A1111's test
    decides (:func:`a1111_prediction`). A multi-stage model (Kandinsky 2.2, DeepFloyd IF)
    resolves to its stages' folders (:attr:`ResolvedModel.stages`); ``optional_stages``
    includes the optional ones (IF's x4 upscaler), which a ``hub:`` reference otherwise
    does not download.

    Raises :class:`~harness.errors.UserError` for every reference that cannot be used: a
    missing file, an unknown zoo name, a hub repository that is missing, gated or not cached
    offline, a file of an unrecognised architecture, or a ``source`` that does not fit.
    """
    if prediction not in ("auto", *PREDICTION_TYPES):
        raise UserError(f"prediction {prediction!r}: expected auto, {', '.join(PREDICTION_TYPES)}")
    resolved = _resolve(reference, source, optional_stages)
    if resolved.stages is not None:
        if prediction != "auto":
            raise UserError(f"model {reference!r}: prediction {prediction!r} is for SD-shaped "
                            "models; a multi-stage model predicts what its stages' configs say")
        return resolved
    if prediction != "auto":
        return dataclasses.replace(resolved, prediction=prediction)
    if resolved.is_single_file and resolved.spec_name is not None:
        spec = get_spec(resolved.spec_name)
        if spec.family == "sd2" and read_spec_metadata(resolved.path) is None:
            return dataclasses.replace(resolved, prediction=a1111_prediction(resolved.path, spec))
    return resolved


def a1111_prediction(path: Path, spec: ModelSpec) -> str:
    """``v`` or ``eps`` for an SD 2.x single file, decided as A1111 decides it
    (``is_using_v_parameterization_for_sd2`` in ``modules/sd_models_config.py``): the UNet at
    t = 999 on latents of 0.5 with a two-token context of 0.5; a v model's output is near
    ``-x0``, so ``mean(out - x) < -1`` means v. An inpainting UNet (9 input channels) is eps,
    as the release is. Runs the file's UNet once in fp32 on 8x8 latents."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from .convert import from_original_state_dict, load_ckpt

    if int(spec.unet["in_channels"]) != 4:
        return "eps"
    if single_file_format(path) == "safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))  # memory-mapped
    else:
        data = load_ckpt(path)
        tensors = data.get("state_dict", data)
    states, missing = from_original_state_dict(spec, {
        key: value for key, value in tensors.items() if key.startswith(UNET_PREFIX)
    })
    missing = [key for key in missing if key.startswith(UNET_PREFIX)]
    if missing:
        raise UserError(
            f"model '{path}': its UNet lacks {len(missing)} tensors ({missing[0]}, ...), so "
            "A1111's prediction test cannot run; expected a complete SD 2.x file"
        )
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(spec.unet)
    unet.load_state_dict({k: v.float() for k, v in states["unet"].items()}, strict=True,
                         assign=True)
    x = torch.full((1, 4, 8, 8), 0.5)
    context = torch.full((1, 2, int(spec.unet["cross_attention_dim"])), 0.5)
    with torch.no_grad():
        out = unet(x, torch.tensor([999]), encoder_hidden_states=context).sample
    return "v" if (out - x).mean().item() < -1 else "eps"


def _resolve(reference: str, source: str, optional_stages: bool = False) -> ResolvedModel:
    if source not in SOURCES:
        raise UserError(f"source {source!r}: expected one of {', '.join(SOURCES)}")
    if reference.startswith(HUB_SCHEME):
        return _resolve_hub(reference, source, optional_stages)
    if reference in SPECS:
        return _resolve_zoo(reference, source)
    if reference in STAGED_SPECS:
        spec = STAGED_SPECS[reference]
        if source != "hub":
            raise UserError(f"model {reference!r}: {no_single_file(spec)}")
        return _staged_folder(reference, materialize(reference, "hub"), reference)
    path = Path(reference).expanduser()
    if path.is_dir():
        if read_stages(path) is not None:
            if source != "hub":
                raise UserError(f"model {reference!r}: is a multi-stage model's folder, but "
                                f"source is {source!r}; expected source hub")
            return _staged_folder(reference, path)
        return _resolve_folder(reference, path, source)
    if path.is_file():
        return _resolve_file(reference, path, source)
    if single_file_format(path) is not None or "/" in reference or os.sep in reference:
        raise UserError(f"model {reference!r}: no such file")
    raise UserError(
        f"model {reference!r}: neither a zoo model ({', '.join(zoo_names())}), an existing path, "
        f"nor {HUB_SCHEME}ORG/NAME"
    )


def _resolve_zoo(name: str, source: str) -> ResolvedModel:
    path = materialize(name, source)
    return ResolvedModel(name, source, path, name, config_folder(name))


def _staged_folder(reference: str, path: Path, spec_name: str | None = None) -> ResolvedModel:
    """A zoo hub folder of a multi-stage model (``stages.json`` and a folder per stage)."""
    index = read_stages(path)
    assert index is not None
    stages = {name: path / folder for name, folder in index["stages"].items()}
    missing = [name for name, folder in stages.items()
               if not (folder / "model_index.json").is_file()]
    if missing:
        raise UserError(f"model {reference!r}: stage folder(s) {', '.join(missing)} have no "
                        "model_index.json; expected a diffusers pipeline folder per stage")
    return ResolvedModel(reference, "hub", path, spec_name or index.get("name"), None,
                         stages=stages, family=str(index["family"]))


#: The main pipeline class of a multi-stage family's hub repository -> (family, the stage it
#: is). A ``hub:`` reference names that repository; the other stages come from
#: :data:`CHAINS`.
MAIN_STAGES: dict[str, tuple[str, str]] = {
    "KandinskyV22Pipeline": ("kandinsky22", "decoder"),
    "IFPipeline": ("deepfloyd-if", "stage_1"),
}
_X4 = "stabilityai/stable-diffusion-x4-upscaler"
#: The public releases' chains: the main repository -> the other stages' repositories, in
#: running order (Kandinsky's decoder model card names its prior; DeepFloyd's model cards
#: pair each stage I with its stage II and the x4 upscaler). The zoo's own chains are added
#: from its specs.
CHAINS: dict[str, dict[str, str]] = {
    "kandinsky-community/kandinsky-2-2-decoder": {
        "prior": "kandinsky-community/kandinsky-2-2-prior"},
    "DeepFloyd/IF-I-XL-v1.0": {"stage_2": "DeepFloyd/IF-II-L-v1.0", OPTIONAL_STAGE: _X4},
    "DeepFloyd/IF-I-L-v1.0": {"stage_2": "DeepFloyd/IF-II-L-v1.0", OPTIONAL_STAGE: _X4},
    "DeepFloyd/IF-I-M-v1.0": {"stage_2": "DeepFloyd/IF-II-M-v1.0", OPTIONAL_STAGE: _X4},
}
CHAINS.update({
    spec.repo_id: {stage.name: spec.stage_repo(stage) for stage in spec.stages
                   if stage is not spec.main_stage}
    for spec in STAGED_SPECS.values()
})


def _main_stage(path: Path) -> tuple[str, str] | None:
    """(family, stage) when the hub folder ``path`` is a multi-stage family's main stage."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return MAIN_STAGES.get(str(index.get("_class_name")))


def _resolve_folder(reference: str, path: Path, source: str) -> ResolvedModel:
    if source != "hub":
        raise UserError(
            f"model {reference!r}: is a folder, but source is {source!r}; expected a "
            f".{source} file or source 'hub'"
        )
    if not (path / "model_index.json").is_file():
        raise UserError(
            f"model {reference!r}: folder has no model_index.json; expected a diffusers hub folder"
        )
    return ResolvedModel(reference, "hub", path, _spec_of_folder(path), path)


def _resolve_file(reference: str, path: Path, source: str) -> ResolvedModel:
    fmt = single_file_format(path)
    if fmt is None:
        raise UserError(
            f"model {reference!r}: expected a .safetensors or .ckpt file or a hub folder"
        )
    if fmt != source:
        raise UserError(f"model {reference!r}: is a .{fmt} file, but source is {source!r}")
    spec = single_file_spec(path)
    return ResolvedModel(reference, fmt, path, spec.name, config_folder(spec))


def single_file_spec(path: Path) -> ModelSpec:
    """The architecture of an original-layout single file: its stored spec, else by shapes."""
    try:
        stored = read_spec_metadata(path)
    except Exception as error:  # a corrupt or foreign file: say which and why
        raise UserError(
            f"model '{path}': cannot be read ({type(error).__name__}: {error})"
        ) from None
    if stored is not None:
        return ModelSpec.from_dict(stored)
    shapes = read_shapes(path)
    attention = sorted(
        (int(match.group(1)), shape)
        for name, shape in shapes.items()
        if (match := _UNET_CONTEXT.fullmatch(name))
    )
    context = attention[0][1][-1] if attention else 0
    key = (shapes.get(_UNET_IN, (0,))[0], context)
    if key not in _KNOWN_SHAPES:
        raise UserError(
            f"model '{path}': unrecognised architecture (UNet width {key[0]}, context {key[1]}); "
            f"expected an {_KNOWN_NAMES} original checkpoint"
        )
    name = _KNOWN_SHAPES[key]
    in_channels = (shapes.get(_UNET_IN) or (0, 0))[1]
    if in_channels == 9 and f"{name}-inpaint" in SPECS:  # the inpainting variant
        name = f"{name}-inpaint"
    return get_spec(name)


def _spec_of_folder(path: Path) -> str | None:
    """The zoo architecture a hub folder has (by its UNet config), or ``None``."""
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    keys = ("block_out_channels", "cross_attention_dim", "layers_per_block", "in_channels",
            "attention_head_dim", "use_linear_projection")
    for name, spec in SPECS.items():
        if all(unet.get(key) == spec.unet.get(key) for key in keys):
            return name
    return None


# --------------------------------------------------------------------------- hub ids


def _hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return value in ("1", "true", "yes", "on") or bool(constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class HubRef:
    """A ``hub:ORG/NAME[@REVISION][/FILE]`` reference, parsed."""

    repo_id: str
    revision: str | None = None
    filename: str | None = None

    @property
    def page(self) -> str:
        """The repository's page on the hub in use (``HF_ENDPOINT``)."""
        from huggingface_hub import constants

        return f"{constants.ENDPOINT.rstrip('/')}/{self.repo_id}"


def _parse_hub(reference: str) -> HubRef:
    """``hub:ORG/NAME[@REVISION][/FILE]`` → its :class:`HubRef`."""
    parts = reference[len(HUB_SCHEME) :].strip("/").split("/", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise UserError(
            f"model {reference!r}: expected {HUB_SCHEME}ORG/NAME[@REVISION] (or ORG/NAME/FILE)"
        )
    name, _, revision = parts[1].partition("@")
    if not name or (parts[1].endswith("@") and not revision):
        raise UserError(f"model {reference!r}: expected {HUB_SCHEME}ORG/NAME@REVISION")
    return HubRef(f"{parts[0]}/{name}", revision or None, parts[2] if len(parts) == 3 else None)


def fetch(reference: str, revision: str | None = None) -> Path:
    """Download ``hub:ORG/NAME[@REVISION][/FILE]`` into the Hugging Face cache (with
    huggingface_hub's progress bars), so that a run finds it there: the folder's weights,
    configs and tokenizers, or the one file; for a multi-stage model's main repository
    (Kandinsky 2.2's decoder, IF's stage I), every stage's repository (:data:`CHAINS`).
    ``revision`` overrides the reference's.

    Raises :class:`~harness.errors.UserError` with what to do for a gated repository
    without a token or without access, a rejected token, a missing repository, revision or
    file, and an offline machine without the files.
    """
    if not reference.startswith(HUB_SCHEME):
        raise UserError(f"model {reference!r}: expected {HUB_SCHEME}ORG/NAME[@REVISION][/FILE]")
    ref = _parse_hub(reference)
    if revision:
        ref = dataclasses.replace(ref, revision=revision)
    fmt = single_file_format(Path(ref.filename)) if ref.filename else None
    zoo_name = _install_zoo_repo(ref, fmt or "hub")
    offline = zoo_name is not None or _hub_offline()
    with _hub_errors(reference, ref, offline):
        if ref.filename is not None:
            return _download_file(ref, ref.filename, offline)
        folder = _download_folder(ref, offline)
    main = _main_stage(folder)
    if main is not None:  # a multi-stage model: every stage, the optional ones too
        _resolve_hub_chain(reference, ref, folder, main, True, offline, True, zoo_name)
    return folder


def _install_zoo_repo(ref: HubRef, fmt: str) -> str | None:
    """The zoo model whose repository ``ref`` names, placed in the local Hugging Face cache
    in format ``fmt`` (the zoo's repos exist only there: they resolve offline); ``None`` for
    any other repository."""
    repos = {spec.repo_id: name for name, spec in SPECS.items()}
    repos.update({spec.repo_id: name for name, spec in STAGED_SPECS.items()})
    name = repos.get(ref.repo_id)
    if name is not None:
        install_in_hf_cache(name, formats=(fmt,))
    return name


def _resolve_hub(reference: str, source: str, optional_stages: bool = False) -> ResolvedModel:
    ref = _parse_hub(reference)
    if ref.filename is not None and source == "hub":
        raise UserError(
            f"model {reference!r}: names a file, but source is 'hub'; expected source "
            f"safetensors or ckpt (or {HUB_SCHEME}{ref.repo_id} for the hub folder)"
        )
    zoo_name = _install_zoo_repo(ref, source)
    offline = zoo_name is not None or _hub_offline()
    path, from_cache = _cache_first(reference, ref, source, offline)
    main = _main_stage(path) if source == "hub" else None
    if main is not None:
        return _resolve_hub_chain(reference, ref, path, main, from_cache, offline,
                                  optional_stages, zoo_name)
    if source == "hub":
        resolved = _resolve_folder(reference, path, "hub")
        spec_name = zoo_name or resolved.spec_name
        config_dir = config_folder(zoo_name) if zoo_name else path
        return ResolvedModel(reference, "hub", path, spec_name, config_dir, from_cache=from_cache)
    spec = single_file_spec(path)
    return ResolvedModel(reference, source, path, spec.name, config_folder(spec),
                         from_cache=from_cache)


def _cache_first(reference: str, ref: HubRef, source: str, offline: bool) -> tuple[Path, bool]:
    """The repository's files, from the Hugging Face cache when they are there (no network
    call), else downloaded; and whether they came from the cache."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    with _hub_errors(reference, ref, offline):
        try:  # the cache first: a run never waits for the network when the files are there
            path = _download(reference, ref, source, offline=True)
            # a snapshot that holds only a single file of the repo is no hub folder
            from_cache = source != "hub" or (path / "model_index.json").is_file() or offline
        except LocalEntryNotFoundError:
            if offline:
                raise
            from_cache = False
        if not from_cache:
            path = _download(reference, ref, source, offline=False)
    return path, from_cache


def _resolve_hub_chain(reference: str, ref: HubRef, path: Path, main: tuple[str, str],
                       from_cache: bool, offline: bool, optional_stages: bool,
                       zoo_name: str | None) -> ResolvedModel:
    """A multi-stage model by its main repository: the other stages' repositories from
    :data:`CHAINS`, each cache-first (so ``from_cache`` is true only if every stage was)."""
    family, main_stage = main
    chain = CHAINS.get(ref.repo_id)
    if chain is None:
        known = ", ".join(HUB_SCHEME + repo for repo, stages in CHAINS.items()
                          if _chain_family(stages) == family and not repo.startswith("sdbench/"))
        raise UserError(
            f"model {reference!r}: is a {family} {main_stage} repository whose other stages "
            f"sdbench does not know; expected one of {known}"
        )
    stages: dict[str, Path] = {}
    for stage, repo in chain.items():
        if stage == OPTIONAL_STAGE and not optional_stages:
            continue
        # errors name the model as written and the stage's repository (its licence, its page)
        stage_path, cached = _cache_first(reference, HubRef(repo), "hub", offline)
        from_cache = from_cache and cached
        stages[stage] = stage_path
    stages[main_stage] = path
    order = [*chain, main_stage] if family == "kandinsky22" else [main_stage, *chain]
    ordered = {name: stages[name] for name in order if name in stages}
    return ResolvedModel(reference, "hub", path, zoo_name, None, from_cache=from_cache,
                         stages=ordered, family=family)


def _chain_family(stages: dict[str, str]) -> str:
    return "kandinsky22" if "prior" in stages else "deepfloyd-if"


def _download(reference: str, ref: HubRef, source: str, offline: bool) -> Path:
    if source == "hub":
        return _download_folder(ref, offline)
    return _download_single_file(reference, ref, source, offline)


def _download_folder(ref: HubRef, offline: bool) -> Path:
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        ref.repo_id, revision=ref.revision, cache_dir=hf_cache_dir(), local_files_only=offline,
        ignore_patterns=_HUB_IGNORE,
    )
    return Path(folder)


def _download_file(ref: HubRef, filename: str, offline: bool) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(ref.repo_id, filename, revision=ref.revision,
                                cache_dir=hf_cache_dir(), local_files_only=offline))


def _download_single_file(reference: str, ref: HubRef, fmt: str, offline: bool) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    filename = ref.filename
    if filename is None:
        if offline:
            folder = Path(
                snapshot_download(
                    ref.repo_id,
                    revision=ref.revision,
                    cache_dir=hf_cache_dir(),
                    local_files_only=True,
                    allow_patterns=[f"*.{fmt}"],
                )
            )
            names = sorted(p.name for p in folder.glob(f"*.{fmt}"))
        else:
            names = sorted(
                f
                for f in HfApi().list_repo_files(ref.repo_id, revision=ref.revision)
                if "/" not in f and f.endswith(f".{fmt}")
            )
        if len(names) != 1:
            found = ", ".join(names) if names else "none"
            raise UserError(
                f"model {reference!r}: expected one .{fmt} file at the repo root, found {found}; "
                f"name it as {HUB_SCHEME}{ref.repo_id}/FILE"
            )
        filename = names[0]
    return _download_file(ref, filename, offline)


@contextmanager
def _hub_errors(reference: str, ref: HubRef, offline: bool) -> Iterator[None]:
    """Turn huggingface_hub's errors into one-line :class:`UserError` messages that name the
    repository and say what to do. The token is huggingface_hub's business (``HF_TOKEN``, the
    ``hf auth login`` file): only whether there is one is read, never its value."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    unreachable: tuple[type[BaseException], ...] = (OSError, *_connection_errors())
    repo = ref.repo_id
    try:
        yield
    except GatedRepoError:
        if get_token() is None:
            raise UserError(
                f"model {reference!r}: {repo} is gated and no Hugging Face token is set; "
                f"accept its licence at {ref.page}, then set HF_TOKEN (or run `hf auth login`)"
            ) from None
        raise UserError(
            f"model {reference!r}: {repo} is gated and the Hugging Face token in use has no "
            f"access; accept its licence at {ref.page} with that token's account"
        ) from None
    except RepositoryNotFoundError:
        private = ("that the token in use has access to it" if get_token() is not None
                   else "a Hugging Face token (set HF_TOKEN)")
        raise UserError(
            f"model {reference!r}: repository {repo} not found on the Hugging Face hub; check "
            f"the name (a private repository also needs {private})"
        ) from None
    except RevisionNotFoundError:
        raise UserError(
            f"model {reference!r}: revision {ref.revision!r} not found in {repo}; expected a "
            "branch, tag or commit of it"
        ) from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise UserError(
            f"model {reference!r}: not in the local Hugging Face cache and {why}; run "
            f"`python -m harness models fetch {reference}` with network access first"
        ) from None
    except EntryNotFoundError:
        raise UserError(
            f"model {reference!r}: file {ref.filename!r} not found in {repo}"
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise UserError(
                f"model {reference!r}: the Hugging Face hub rejected the token in use "
                "(invalid or expired); set HF_TOKEN to a valid token or run `hf auth login`"
            ) from None
        raise UserError(
            f"model {reference!r}: the Hugging Face hub answered HTTP {status} for {repo}"
        ) from None
    except unreachable as error:
        raise UserError(
            f"model {reference!r}: cannot reach the Hugging Face hub ({type(error).__name__}); "
            f"set HF_HUB_OFFLINE=1 to use the local cache"
        ) from None


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Transport errors of the HTTP client huggingface_hub uses (``httpx2`` or ``httpx``)."""
    errors: list[type[BaseException]] = []
    for module_name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        errors.append(module.TransportError)
    return tuple(errors)
