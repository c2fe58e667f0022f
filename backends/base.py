"""The backend interface: a backend loads a model into a session; a session generates.

A backend outside sdbench registers itself with an entry point (:mod:`backends`); the names an
adapter needs are in :mod:`backends.api`, and docs/backends.md is the step-by-step guide.

The harness owns everything that must be the same for every backend: the initial latent
noise (drawn once, on the CPU, from the cell's seed, and handed to the backend in
:attr:`Request.noise`), the timer (a backend wraps its phases in ``timer.phase(...)`` and
calls ``timer.step()`` after every denoising step) and the memory monitor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:
    from harness.matrix import Cell
    from harness.measure import GenerationTimer
    from models.sources import ResolvedModel

#: Why a ControlNet cell on an SDXL model is ``unsupported`` on every backend.
SDXL_CONTROLNET_UNSUPPORTED = (
    "ControlNet with an SDXL model: the zoo's ControlNets are SD 1.x / 2.x nets and SDXL "
    "ControlNets are not wired"
)



def staged_unsupported(family: str) -> str:
    """Why a cell of a multi-stage family (Kandinsky 2.2, DeepFloyd IF) is ``unsupported`` on
    a backend that runs SD-shaped models only."""
    return (f"{family}: the original (A1111 / CompVis LDM) backend never ran this family; "
            "its releases are diffusers pipelines, which the diffusers backend runs")


TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class Request:
    """One generation, backend-neutral."""

    prompt: str
    negative_prompt: str
    batch: int
    steps: int
    width: int
    height: int
    sampler: str
    guidance: float
    seed: int
    #: Initial latents ~ N(0, 1), float32 on the CPU, shape :meth:`Session.latent_shape`.
    #: Backends scale it by their first sigma (or ``init_noise_sigma``) themselves.
    noise: torch.Tensor
    #: txt2img | img2img | inpaint | hires. The harness turns outpaint into inpaint on an
    #: enlarged canvas (``width``/``height`` are then the canvas size).
    workflow: str = "txt2img"
    #: img2img / inpaint input, float32 ``[height, width, 3]`` in ``[0, 1]``.
    init_image: np.ndarray | None = None
    #: inpaint mask, float32 ``[height, width]`` in ``[0, 1]``; 1 = repaint, 0 = keep.
    mask: np.ndarray | None = None
    #: img2img / inpaint denoising strength, and the strength of the hires second pass.
    strength: float = 0.75
    hires_scale: float = 2.0
    #: ``latent`` (interpolate latents) or ``image`` (decode, resize, encode).
    hires_upscaler: str = "latent"
    #: N(0, 1) noise of the upscaled latent shape for the hires second pass.
    hires_noise: torch.Tensor | None = None
    loras: tuple[LoraRef, ...] = ()
    embeddings: tuple[EmbeddingRef, ...] = ()
    #: ControlNets applied to every denoising step (several: their residuals add up).
    controls: tuple[ControlRef, ...] = ()
    #: How the controls meet classifier-free guidance (A1111's names):
    #: :data:`harness.vocabulary.CONTROL_MODES`.
    control_mode: str = "balanced"
    #: The part of the steps the controls apply to, as fractions: step ``i`` of ``N`` has
    #: them iff neither ``i / N < control_start`` nor ``(i + 1) / N > control_end``.
    control_start: float = 0.0
    control_end: float = 1.0
    #: A multi-stage model's start noise of the stages other than the one :attr:`noise` is
    #: for, N(0, 1) float32 on the CPU, shapes :meth:`Session.stage_noise_shapes`.
    stage_noise: dict[str, torch.Tensor] = field(default_factory=dict)
    #: A multi-stage model's steps and guidance per stage where they are not ``steps`` /
    #: ``guidance`` (the ``stage_steps`` / ``stage_guidance`` axes).
    stage_steps: dict[str, int] = field(default_factory=dict)
    stage_guidance: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoraRef:
    """A LoRA file (kohya / A1111 layout) applied at ``strength``."""

    path: Path
    strength: float


@dataclass(frozen=True)
class ControlRef:
    """A ControlNet, its control image and its conditioning scale.

    ``path`` is the original single file (``control_model.*``); ``folder``, where there is
    one, the same net as a diffusers ``ControlNetModel`` folder (a backend that reads that
    layout may prefer it); ``config`` a folder with the net's ``config.json`` for reading the
    single file in a backend that needs one. At least one of ``path`` and ``folder`` is set.
    """

    path: Path | None
    scale: float
    #: The control image, float32 ``[height, width, 3]`` in ``[0, 1]`` at the output size.
    image: np.ndarray = field(repr=False, compare=False, hash=False)
    folder: Path | None = None
    config: Path | None = None

    @property
    def source(self) -> Path:
        """The file or folder the net comes from (for messages and caches)."""
        found = self.path or self.folder
        if found is None:
            raise ValueError("a ControlRef needs a path or a folder")
        return found


@dataclass(frozen=True)
class EmbeddingRef:
    """A textual-inversion embedding whose trigger word is ``token``.

    Either ``path`` (an A1111 ``.pt`` / ``.safetensors`` file, loaded by the backend's own
    loader) or ``vectors`` (``[n_vectors, hidden]``, the same vectors put in by hand; for
    SDXL a dict of each text encoder's, ``clip_l`` and ``clip_g``).
    """

    token: str
    path: Path | None = None
    vectors: torch.Tensor | dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class Output:
    """What a generation produced."""

    #: float32 ``[batch, height, width, 3]`` in ``[0, 1]``.
    images: np.ndarray
    #: Final latents before VAE decode (UNet latent space, not divided by the scale factor),
    #: float32 ``[batch, C, height / f, width / f]``, on any device (copying it to the CPU
    #: inside the timed generation would add a device synchronisation).
    latents: torch.Tensor


class Session(ABC):
    """A model loaded by a backend with one load key (dtype, offload, compile, ...)."""

    #: Latent channels and VAE down-sampling factor of the loaded model.
    latent_channels: int = 4
    vae_scale_factor: int = 8

    def latent_shape(self, batch: int, width: int, height: int) -> tuple[int, int, int, int]:
        f = self.vae_scale_factor
        if width % f or height % f:
            raise ValueError(
                f"resolution {width}x{height} is not a multiple of the VAE factor {f}"
            )
        return (batch, self.latent_channels, height // f, width // f)

    def stage_noise_shapes(self, batch: int, width: int, height: int) -> dict[str, tuple[int, ...]]:
        """A multi-stage model's stages that start from noise of their own, besides the
        one :attr:`Request.noise` is for, and that noise's shape (empty: one stage)."""
        return {}

    def prepare(self, request: Request) -> None:  # noqa: B027 - optional hook
        """Set up what ``request`` needs that is not the generation — its sampler, LoRA
        weights, embeddings, workflow pipelines — so that :meth:`generate` finds it done.

        The harness calls it before the clock starts (DESIGN.md: the timed wall is prompt
        encoding, denoising and VAE decode). :meth:`generate` must still work without it, so
        a session calls it from there too and makes the repeat cheap (e.g. a no-op when the
        last prepared request needed the same).
        """

    @abstractmethod
    def generate(self, request: Request, timer: GenerationTimer) -> Output:
        """Run one whole generation: encode prompt, denoise, decode."""

    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """VAE-encode ``image`` (``[H, W, 3]`` in [0, 1]) with the posterior's mode, times the
        scale factor: the init latents of img2img / inpaint. Used by conformance checks."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its VAE encoder")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the session holds (device memory first)."""


class Backend(ABC):
    """A generation backend."""

    name: ClassVar[str]
    #: Distributions (pip names) whose versions identify this backend's code, besides the
    #: package that defines the class, which counts by itself. Their versions go into every
    #: result's environment (``backend_packages``) and its fingerprint, so a baseline of
    #: ``myapp 1.2`` is never compared with ``myapp 1.3`` unseen. The built-in backends' own
    #: libraries (torch, diffusers, transformers, accelerate) are environment fields already.
    packages: ClassVar[tuple[str, ...]] = ()
    #: Whether prompts longer than 75 tokens keep their tail (A1111-style chunking) or are
    #: truncated to the text encoder's 77 positions; a conformance check verifies the claim.
    long_prompts: ClassVar[bool] = False
    #: Whether the backend applies :attr:`Request.controls` (ControlNet). The harness reports
    #: a ControlNet cell ``unsupported`` on a backend that does not say so, rather than let
    #: it ignore the controls and measure another workload.
    controlnet: ClassVar[bool] = False

    @classmethod
    def versions(cls) -> dict[str, str]:
        """``{distribution: version}`` of the code this backend runs: the distribution that
        provides the class's package (not sdbench itself: its commit is recorded apart) and
        :attr:`packages`. Read from the installed metadata; imports nothing. A package that is
        not installed reads ``not installed``.
        """
        top = cls.__module__.partition(".")[0]
        owners = [d for d in metadata.packages_distributions().get(top, []) if d != "sdbench"]
        found: dict[str, str] = {}
        for name in (*owners, *cls.packages):
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                found[name] = "not installed"
        return found

    def imports(self) -> None:  # noqa: B027 - optional hook
        """Import the libraries :meth:`load` needs (lazily imported modules included).

        The harness calls it before it starts a load's clock, so that ``load_s`` is files to
        ready and not Python's imports; worker templates call it to preload them.
        """

    def unsupported(self, cell: Cell, device: torch.device) -> str | None:
        """Why this backend cannot run ``cell`` on ``device`` here, or None if it can.

        Called before loading; must be cheap and must not touch the device.
        """
        return None

    @abstractmethod
    def load(self, cell: Cell, model: ResolvedModel, device: torch.device) -> Session:
        """Load the model for the cell's load key and return a ready session."""
