"""The backend interface: a backend loads a model into a session; a session generates.

Adding a backend touches its own module and one line of :data:`backends.REGISTRY`.

The harness owns everything that must be the same for every backend: the initial latent
noise (drawn once, on the CPU, from the cell's seed, and handed to the backend in
:attr:`Request.noise`), the timer (a backend wraps its phases in ``timer.phase(...)`` and
calls ``timer.step()`` after every denoising step) and the memory monitor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:
    from harness.matrix import Cell
    from harness.measure import GenerationTimer
    from models.sources import ResolvedModel

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
    workflow: str = "txt2img"
    extra: dict[str, Any] = field(default_factory=dict)


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

    @abstractmethod
    def generate(self, request: Request, timer: GenerationTimer) -> Output:
        """Run one whole generation: encode prompt, denoise, decode."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the session holds (device memory first)."""


class Backend(ABC):
    """A generation backend."""

    name: ClassVar[str]

    def unsupported(self, cell: Cell, device: torch.device) -> str | None:
        """Why this backend cannot run ``cell`` on ``device`` here, or None if it can.

        Called before loading; must be cheap and must not touch the device.
        """
        return None

    @abstractmethod
    def load(self, cell: Cell, model: ResolvedModel, device: torch.device) -> Session:
        """Load the model for the cell's load key and return a ready session."""
