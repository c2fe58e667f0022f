"""A cell: one workload with every axis fixed, plus its scenario's run settings.

Plain Python (no pydantic, no pandas): backends receive cells (``Backend.load``,
``Backend.unsupported``) and import this module for them. :mod:`harness.matrix` makes cells
from scenarios.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from harness import axes as axis_table
from harness.vocabulary import CONTROLNET_WORKFLOWS

#: Default wall-clock budget of one model load (seconds): generous, it only stops a hang.
DEFAULT_LOAD_TIMEOUT_S = 1800.0
#: A cell whose it/s varies more than this over its repeats (coefficient of variation) is
#: marked noisy in every table that shows it/s.
DEFAULT_NOISE_LIMIT = 0.05

#: Axes that change what is loaded; the others vary within one loaded session.
LOAD_AXES: tuple[str, ...] = axis_table.load_axes()


#: Cell fields that say where a cell came from, how long it may take or how its figures are
#: read, not what it measures.
_NOT_WORKLOAD = frozenset(
    {"id", "scenario_path", "scenario_fingerprint", "timeout_s", "load_timeout_s",
     "noise_limit"}
)


@dataclass(frozen=True)
class Cell:
    """One workload: every axis fixed, plus the scenario's run settings."""

    scenario: str
    scenario_path: str
    scenario_fingerprint: str
    id: str
    backend: str
    model: str
    source: str
    workflow: str
    device: str
    dtype: str
    offload: str
    compile: str
    fullgraph: bool
    attention: str
    channels_last: bool
    sampler: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    batch: int
    prompt: str
    negative_prompt: str
    repeats: int
    warmup: int
    timeout_s: float | None
    # workflow parameters and features (defaults as in harness.scenario.AXES)
    strength: float = 0.75
    init_image: str = "generated"
    mask: str = "center"
    outpaint_px: int = 32
    hires_scale: float = 2.0
    hires_upscaler: str = "latent"
    lora: str = "none"
    embedding: str = "none"
    checks: tuple[str, ...] = ()
    load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S
    #: The scenario's ``thresholds.noise``: the it/s CV beyond which the cell reads as noisy.
    noise_limit: float = DEFAULT_NOISE_LIMIT
    #: Values of axes of :data:`harness.axes.AXES` that have no field of their own here, as
    #: sorted ``(name, value)`` pairs; read them as attributes (``cell.NAME``) all the same.
    axes: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, name: str) -> Any:
        # only called for names that are not fields: the axes without a field of their own
        for key, value in self.__dict__.get("axes", ()):
            if key == name:
                return value
        axis = axis_table.by_name().get(name)
        if axis is not None and name != "resolution":
            return axis.default
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def resolution(self) -> tuple[int, int]:
        return (self.width, self.height)

    def load_key(self) -> tuple[Any, ...]:
        """Cells with equal keys share one loaded backend session."""
        return tuple(getattr(self, axis) for axis in LOAD_AXES)

    def fingerprint(self) -> str:
        """A short hash of the cell's workload: every field but where it came from and its
        time budgets. Equal fingerprints measure the same thing (``run --resume``)."""
        workload = {
            key: value
            for key, value in self.to_dict().items()
            if key not in _NOT_WORKLOAD
        }
        canonical = json.dumps(workload, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def nodeid(self) -> str:
        """``scenarios/smoke.yaml::diffusers-hub-b2``: unique across scenario files."""
        return f"{self.scenario_path}::{self.id}"

    def to_dict(self) -> dict[str, Any]:
        """Every field, the axes without a field of their own flattened in."""
        data = asdict(self)
        data.update(data.pop("axes"))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cell:
        names = field_names()
        values = {key: value for key, value in data.items() if key in names and key != "axes"}
        values["checks"] = tuple(values.get("checks", ()))
        values["axes"] = own_axes(data)
        return cls(**values)

    @property
    def base_workflow(self) -> str:
        """The workflow a backend runs: a ControlNet workflow's base (``controlnet_img2img`` →
        ``img2img``), otherwise the cell's own."""
        return CONTROLNET_WORKFLOWS.get(self.workflow, self.workflow)

    @property
    def uses_controlnet(self) -> bool:
        return self.workflow in CONTROLNET_WORKFLOWS

    @property
    def denoise_steps(self) -> int:
        """Denoising steps one generation runs: img2img-like workflows run
        ``int(steps * strength)`` (the rule both backends follow), the hires fix a full first
        pass plus such a second pass. The ``steps`` of ``batch × steps / wall``."""
        partial = min(int(self.steps * self.strength), self.steps)
        if self.base_workflow in ("img2img", "inpaint", "outpaint"):
            return partial
        if self.workflow == "hires":
            return self.steps + partial
        return self.steps

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the images the cell produces."""
        if self.workflow == "outpaint":
            return (self.width + 2 * self.outpaint_px, self.height + 2 * self.outpaint_px)
        if self.workflow == "hires":
            return (_round8(self.width * self.hires_scale), _round8(self.height * self.hires_scale))
        return (self.width, self.height)


def field_names() -> set[str]:
    return {field.name for field in fields(Cell)}


def own_axes(values: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The values of the axes that are not :class:`Cell` fields, as ``Cell.axes``."""
    own = field_names()
    return tuple(sorted(
        (axis.name, values[axis.name]) for axis in axis_table.AXES
        if axis.name not in own and axis.name != "resolution" and axis.name in values
    ))


def _round8(value: float) -> int:
    return int(round(value / 8)) * 8


