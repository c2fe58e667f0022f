"""Conformance: does every workflow still work, and give the same result on both backends?

Checks run after a cell's measurement, on the loaded session, when the scenario lists them
in ``checks`` (``determinism``, ``semantics``, ``parity``). Each gives a :class:`Check`:
``pass``, ``fail`` (reason), ``differs`` (the metric), ``unsupported`` (reason) or ``error``.

- **determinism**: the same request twice gives the same image, bit for bit.
- **semantics**, chosen by the cell's workflow and features:

  - ``long_prompt`` (txt2img): tokens after position 77 change the output on a backend that
    claims long prompts (:attr:`backends.base.Backend.long_prompts`) and not on one that
    truncates;
  - ``img2img_strength0``: at strength 0 the final latents are the init image's latents;
  - ``inpaint_keeps_unmasked``: the final latents outside the (latent-size) mask are the init
    image's latents;
  - ``lora_strength0``: all LoRAs at strength 0 give the no-LoRA output;
    ``lora_monotonic``: the output moves further from the no-LoRA output as the first LoRA's
    strength grows (0.25, 0.5, 1.0); ``lora_merged``: the output equals that of the model
    with the files' deltas merged into its weights by hand (:func:`models.merge_loras`, every
    network type's delta as :meth:`models.LoraLayer.delta` defines it);
  - ``embedding_effect``: the trigger word changes the output; ``embedding_by_hand``: the same
    vectors handed over as tensors give the same image as the file;
  - ``controlnet_scale0``: every ControlNet at conditioning scale 0 gives the output of the
    same workflow without ControlNet; ``controlnet_image_effect``: another control image (the
    edge map of another picture) changes the output.

  Latent-space checks stand in for pixel checks because the zoo's VAE has random weights, so
  decoding does not reproduce an input image; the latents are what the workflows promise.
- **parity** (:class:`ParityTracker`): the final latents and images of the same cell on the
  other backend (same weights, seed, noise and sampler): latent relative error and image PSNR
  against per-dtype thresholds (:data:`PARITY_THRESHOLDS`).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.base import Backend, EmbeddingRef, LoraRef, Output, Request, Session
from harness.errors import UnsupportedError, UserError
from harness.matrix import Cell
from harness.measure import GenerationTimer
from harness.vocabulary import KEEPS, TRUNCATES

CHECK_STATUSES: tuple[str, ...] = ("pass", "fail", "differs", "unsupported", "error")
#: Relative error below which two outputs of one backend count as equal, per dtype.
EQUAL_TOLERANCE: dict[str, float] = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}
#: Cross-backend parity thresholds per dtype: (max latent relative error, min image PSNR dB).
PARITY_THRESHOLDS: dict[str, tuple[float, float]] = {
    "fp32": (1e-3, 40.0),
    "fp16": (5e-2, 25.0),
    "bf16": (1e-1, 20.0),
}
#: PSNR reported for identical images (the true value is infinite).
PSNR_IDENTICAL = 100.0


@dataclass(frozen=True)
class Check:
    """The outcome of one check."""

    status: str
    detail: str
    value: float | None = None
    #: What the check observed, as a word reports read (``detail`` is for people): the
    #: long-prompt check's ``keeps`` / ``truncates``; None for checks with nothing to add.
    finding: str | None = None

    def __post_init__(self) -> None:
        if self.status not in CHECK_STATUSES:
            raise ValueError(f"status must be one of {CHECK_STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- metrics ------------------------------------------------------------------------------


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` in float64 on the CPU."""
    a = value.detach().to("cpu", torch.float64)
    b = reference.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    denominator = float(b.norm())
    return float((a - b).norm()) / (denominator if denominator > 0 else 1.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] as 8-bit, rounded as when saved to a PNG."""
    return np.clip(np.nan_to_num(images) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of two 8-bit images (or images in [0, 1]); :data:`PSNR_IDENTICAL` if equal."""
    if images.shape != reference.shape:
        raise ValueError(f"shapes differ: {images.shape} vs {reference.shape}")
    peak = 255.0 if images.dtype == np.uint8 else 1.0
    mse = float(np.mean((images.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return PSNR_IDENTICAL if mse == 0 else min(PSNR_IDENTICAL, 10 * math.log10(peak**2 / mse))


# --- per-cell checks ----------------------------------------------------------------------


@dataclass
class CheckContext:
    """What a check may use: the cell, its backend and session, and the measured output."""

    cell: Cell
    backend: Backend
    session: Session
    request: Request
    output: Output
    device: torch.device
    #: An untimed generation on the loaded session.
    generate: Callable[[Request], Output]

    @property
    def tolerance(self) -> float:
        return EQUAL_TOLERANCE[self.cell.dtype]

    def same(self, value: Output, reference: Output) -> tuple[bool, float]:
        error = relative_error(value.latents, reference.latents)
        return error <= self.tolerance, error


CheckFn = Callable[[CheckContext], Check]


def check_determinism(ctx: CheckContext) -> Check:
    again = ctx.generate(ctx.request)
    if np.array_equal(again.images, ctx.output.images):
        return Check("pass", "same seed twice: identical images", 0.0)
    difference = float(np.abs(again.images - ctx.output.images).max())
    return Check("fail", f"same seed twice: images differ by up to {difference:.3g}", difference)


_FILLER = "red"
_CHANGED = "blue"


def long_prompts(base: str) -> tuple[str, str]:
    """Two prompts of 90+ words that differ only after word 80 (past token 77)."""
    head = f"{base} " + " ".join([_FILLER] * 80)
    return f"{head} " + " ".join([_FILLER] * 10), f"{head} " + " ".join([_CHANGED] * 10)


def check_long_prompt(ctx: CheckContext) -> Check:
    first, second = long_prompts(ctx.request.prompt)
    a = ctx.generate(dataclasses.replace(ctx.request, prompt=first))
    b = ctx.generate(dataclasses.replace(ctx.request, prompt=second))
    equal, error = ctx.same(b, a)
    finding = TRUNCATES if equal else KEEPS
    if ctx.backend.long_prompts:
        if not equal:
            return Check(
                "pass",
                f"keeps long prompts: tokens past 77 change the output "
                f"(latent rel. error {error:.3g})",
                error,
                finding,
            )
        return Check("fail", "claims long prompts, but tokens past 77 change nothing", error,
                     finding)
    if equal:
        return Check("pass", "truncates at 77 tokens: tokens past 77 change nothing", error,
                     finding)
    return Check(
        "fail",
        f"claims to truncate, but tokens past 77 change the output (latent rel. error {error:.3g})",
        error,
        finding,
    )


def _init_latents(ctx: CheckContext) -> torch.Tensor:
    if ctx.request.init_image is None:
        raise ValueError("the request has no init image")
    return ctx.session.encode_image(ctx.request.init_image)


def check_img2img_strength0(ctx: CheckContext) -> Check:
    output = ctx.generate(dataclasses.replace(ctx.request, strength=0.0))
    init = _init_latents(ctx).expand_as(output.latents.to("cpu"))
    error = relative_error(output.latents, init)
    if error <= ctx.tolerance:
        return Check(
            "pass", f"strength 0 returns the input latents (rel. error {error:.3g})", error
        )
    return Check("differs", f"strength 0: latents differ from the input's by {error:.3g}", error)


def latent_mask(mask: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """The pixel mask at latent size (nearest), ``[1, 1, h, w]``."""
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(tensor, size=tuple(shape[-2:]), mode="nearest")


def check_inpaint_keeps_unmasked(ctx: CheckContext) -> Check:
    if ctx.request.mask is None:
        raise ValueError("the request has no mask")
    latents = ctx.output.latents.detach().to("cpu", torch.float32)
    keep = latent_mask(ctx.request.mask, latents.shape) < 0.5
    if not bool(keep.any()):
        return Check("unsupported", "the mask leaves no latent position unmasked")
    init = _init_latents(ctx).to(torch.float32).expand_as(latents)
    keep = keep.expand_as(latents)
    error = relative_error(latents[keep], init[keep])
    if error <= ctx.tolerance:
        return Check("pass", f"unmasked latents unchanged (rel. error {error:.3g})", error)
    return Check("differs", f"unmasked latents changed by {error:.3g} (relative)", error)


def _without_loras(request: Request) -> Request:
    return dataclasses.replace(request, loras=())


def check_lora_strength0(ctx: CheckContext) -> Check:
    zero = tuple(LoraRef(ref.path, 0.0) for ref in ctx.request.loras)
    at_zero = ctx.generate(dataclasses.replace(ctx.request, loras=zero))
    base = ctx.generate(_without_loras(ctx.request))
    equal, error = ctx.same(at_zero, base)
    if equal:
        return Check("pass", f"strength 0 equals no LoRA (rel. error {error:.3g})", error)
    return Check("fail", f"strength 0 differs from no LoRA by {error:.3g}", error)


def check_lora_monotonic(ctx: CheckContext) -> Check:
    base = ctx.generate(_without_loras(ctx.request))
    first = ctx.request.loras[0]
    distances = []
    for strength in (0.25, 0.5, 1.0):
        ref = LoraRef(first.path, strength)
        output = ctx.generate(dataclasses.replace(ctx.request, loras=(ref,)))
        distances.append(relative_error(output.latents, base.latents))
    shown = ", ".join(f"{d:.3g}" for d in distances)
    if distances[0] > 0 and distances[0] < distances[1] < distances[2]:
        return Check("pass", f"distance from no LoRA grows with strength: {shown}", distances[2])
    return Check(
        "fail", f"distance from no LoRA at 0.25/0.5/1.0 not increasing: {shown}", distances[2]
    )


def check_lora_merged(ctx: CheckContext, load_merged: Callable[[Path], Session]) -> Check:
    from models import merge_loras

    with tempfile.TemporaryDirectory(prefix="sdbench-merged-") as folder:
        target = Path(folder) / "merged.safetensors"
        loras = [(ref.path, ref.strength) for ref in ctx.request.loras]
        merge_loras(ctx.cell.model, ctx.cell.source, loras, target)
        session = load_merged(target)
        try:
            with GenerationTimer(ctx.device) as timer:
                merged = session.generate(_without_loras(ctx.request), timer)
        finally:
            session.close()
    error = relative_error(ctx.output.latents, merged.latents)
    limit = PARITY_THRESHOLDS[ctx.cell.dtype][0]
    strengths = ", ".join(f"{ref.strength:g}" for ref in ctx.request.loras)
    if error <= limit:
        return Check(
            "pass",
            f"LoRAs at ({strengths}) equal the weights merged by hand "
            f"(latent rel. error {error:.3g})",
            error,
        )
    return Check(
        "differs",
        f"LoRAs at ({strengths}) differ from the merged weights by {error:.3g} (relative)",
        error,
    )


def check_embedding_effect(ctx: CheckContext) -> Check:
    without = ctx.generate(dataclasses.replace(ctx.request, embeddings=()))
    equal, error = ctx.same(ctx.output, without)
    tokens = ", ".join(ref.token for ref in ctx.request.embeddings)
    if equal:
        return Check("fail", f"trigger word(s) {tokens}: the embedding changes nothing", error)
    return Check("pass", f"trigger word(s) {tokens} change the output (rel. {error:.3g})", error)


def check_embedding_by_hand(ctx: CheckContext) -> Check:
    from models import read_embedding

    by_hand = []
    for ref in ctx.request.embeddings:
        if ref.path is None:
            by_hand.append(ref)
            continue
        _token, vectors = read_embedding(ref.path)
        by_hand.append(EmbeddingRef(token=ref.token, vectors=vectors))
    output = ctx.generate(dataclasses.replace(ctx.request, embeddings=tuple(by_hand)))
    equal, error = ctx.same(output, ctx.output)
    if equal:
        return Check(
            "pass", f"vectors put in by hand give the same image (rel. {error:.3g})", error
        )
    return Check("fail", f"vectors put in by hand differ from the file's by {error:.3g}", error)


def check_controlnet_scale0(ctx: CheckContext) -> Check:
    zero = tuple(dataclasses.replace(ref, scale=0.0) for ref in ctx.request.controls)
    at_zero = ctx.generate(dataclasses.replace(ctx.request, controls=zero))
    plain = ctx.generate(dataclasses.replace(ctx.request, controls=()))
    equal, error = ctx.same(at_zero, plain)
    if equal:
        return Check("pass", f"scale 0 equals no ControlNet (rel. error {error:.3g})", error)
    return Check("fail", f"scale 0 differs from no ControlNet by {error:.3g}", error)


def check_controlnet_image_effect(ctx: CheckContext) -> Check:
    from harness.inputs import edge_map, generated_image

    request = ctx.request
    other = edge_map(generated_image(request.width, request.height, ctx.cell.seed + 1))
    changed = tuple(dataclasses.replace(ref, image=other) for ref in request.controls)
    output = ctx.generate(dataclasses.replace(request, controls=changed))
    equal, error = ctx.same(output, ctx.output)
    if equal:
        return Check("fail", "another control image changes nothing", error)
    return Check("pass", f"another control image changes the output (rel. {error:.3g})", error)


def semantic_checks(
    cell: Cell, request: Request, load_merged: Callable[[Path], Session]
) -> dict[str, CheckFn]:
    """The semantic checks that apply to a cell, by name."""
    checks: dict[str, CheckFn] = {}
    if cell.workflow == "txt2img" and not request.loras and not request.embeddings:
        checks["long_prompt"] = check_long_prompt
    if cell.base_workflow == "img2img":
        checks["img2img_strength0"] = check_img2img_strength0
    if cell.base_workflow in ("inpaint", "outpaint"):
        checks["inpaint_keeps_unmasked"] = check_inpaint_keeps_unmasked
    if request.loras:
        checks["lora_strength0"] = check_lora_strength0
        checks["lora_monotonic"] = check_lora_monotonic
        checks["lora_merged"] = lambda ctx: check_lora_merged(ctx, load_merged)
    if request.embeddings:
        checks["embedding_effect"] = check_embedding_effect
        checks["embedding_by_hand"] = check_embedding_by_hand
    if request.controls:
        checks["controlnet_scale0"] = check_controlnet_scale0
        checks["controlnet_image_effect"] = check_controlnet_image_effect
    return checks


def _guarded(check: CheckFn, ctx: CheckContext) -> Check:
    try:
        return check(ctx)
    except (UnsupportedError, NotImplementedError) as error:
        return Check("unsupported", str(error).splitlines()[0] if str(error) else "unsupported")
    except UserError as error:
        return Check("error", str(error))
    except Exception as error:  # noqa: BLE001 - a broken check is that check's error
        return Check("error", f"{type(error).__name__}: {error}".splitlines()[0][:300])


def run_checks(ctx: CheckContext, load_merged: Callable[[Path], Session]) -> dict[str, Check]:
    """Run the cell's checks (``determinism``, ``semantics``) on the loaded session."""
    results: dict[str, Check] = {}
    if "determinism" in ctx.cell.checks:
        results["determinism"] = _guarded(check_determinism, ctx)
    if "semantics" in ctx.cell.checks:
        for name, check in semantic_checks(ctx.cell, ctx.request, load_merged).items():
            results[name] = _guarded(check, ctx)
    return results


# --- cross-backend parity -----------------------------------------------------------------

#: Cell fields that do not enter the parity key: who runs it and from which file layout.
_NOT_IN_PARITY_KEY = frozenset(
    {
        "backend",
        "source",
        "id",
        "scenario_path",
        "scenario_fingerprint",
        "checks",
        "repeats",
        "warmup",
        "timeout_s",
    }
)


def parity_key(cell: Cell) -> tuple[Any, ...]:
    """Cells with equal keys on different backends should produce the same image."""
    return tuple(
        (name, value)
        for name, value in sorted(cell.to_dict().items())
        if name not in _NOT_IN_PARITY_KEY
    )


@dataclass
class _Kept:
    cell: Cell
    latents: torch.Tensor
    images: np.ndarray


class ParityTracker:
    """Keeps each backend's first output per parity key and compares later cells with it.

    With :meth:`plan`, only outputs that another backend's cell will need are kept.
    """

    def __init__(self) -> None:
        self._kept: dict[tuple[Any, ...], list[_Kept]] = {}
        self._wanted: set[tuple[Any, ...]] | None = None

    def plan(self, cells: list[Cell]) -> None:
        backends: dict[tuple[Any, ...], set[str]] = {}
        for cell in cells:
            backends.setdefault(parity_key(cell), set()).add(cell.backend)
        self._wanted = {key for key, names in backends.items() if len(names) > 1}

    def wants(self, cell: Cell) -> bool:
        """Whether :meth:`record` needs this cell's output (another backend's cell will)."""
        return self._wanted is None or parity_key(cell) in self._wanted

    def record(self, cell: Cell, latents: torch.Tensor, images: np.ndarray) -> dict[str, Any]:
        """Parity figures of ``cell`` against an earlier cell of another backend, if any.

        ``latents`` are the final latents on the CPU in float32, ``images`` the 8-bit images
        (:func:`to_uint8`, as they are saved: a quarter of the memory).
        """
        if not self.wants(cell):
            return {}
        key = parity_key(cell)
        kept = self._kept.setdefault(key, [])
        reference = next((k for k in kept if k.cell.backend != cell.backend), None)
        if not any(k.cell.backend == cell.backend for k in kept):
            kept.append(_Kept(cell, latents, images))
        if reference is None:
            return {}
        error = relative_error(latents, reference.latents)
        quality = psnr(images, reference.images)
        max_error, min_psnr = PARITY_THRESHOLDS[cell.dtype]
        ok = error <= max_error and quality >= min_psnr
        detail = (
            f"vs {reference.cell.id}: latent rel. error {error:.3g}, PSNR {quality:.1f} dB "
            f"(limits {max_error:g}, {min_psnr:g} dB for {cell.dtype})"
        )
        return {
            "parity_ref": reference.cell.id,
            "parity_ref_backend": reference.cell.backend,
            "parity_latent_rel_err": error,
            "parity_psnr_db": quality,
            "parity_status": "pass" if ok else "differs",
            "parity_check": Check("pass" if ok else "differs", detail, error).to_dict(),
        }
