"""Matrix expansion: a :class:`~harness.scenario.Scenario` becomes a list of :class:`Cell`.

Order of operations follows CI matrices: the cartesian product of the axis lists, minus every
combination that matches an ``exclude`` entry (all keys of the entry equal), plus one cell per
``include`` entry (axes the entry does not name take the first value listed for that axis).
Duplicates are dropped, keeping the first.

Cells that share a :meth:`Cell.load_key` are run from one loaded model, so a sweep of batch
sizes, steps, resolutions or samplers costs one load.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from harness.scenario import AXES, DEFAULT_LOAD_TIMEOUT_S, DEFAULT_NOISE_LIMIT, Scenario

#: Axes that change what is loaded; the others vary within one loaded session.
LOAD_AXES: tuple[str, ...] = (
    "backend",
    "model",
    "source",
    "device",
    "dtype",
    "offload",
    "compile",
    "fullgraph",
    "attention",
    "channels_last",
)

#: Axis order in readable cell ids, and how a value is spelled there.
_ID_ORDER: tuple[str, ...] = (
    "backend",
    "model",
    "workflow",
    "offload",
    "source",
    "device",
    "dtype",
    "compile",
    "fullgraph",
    "attention",
    "channels_last",
    "sampler",
    "resolution",
    "steps",
    "guidance",
    "seed",
    "batch",
    "strength",
    "init_image",
    "mask",
    "outpaint_px",
    "hires_scale",
    "hires_upscaler",
    "lora",
    "embedding",
)


#: Workflow parameters appear in an id only for the workflows that use them.
_USED_BY: dict[str, frozenset[str]] = {
    "strength": frozenset({"img2img", "inpaint", "outpaint", "hires"}),
    "init_image": frozenset({"img2img", "inpaint", "outpaint"}),
    "mask": frozenset({"inpaint"}),
    "outpaint_px": frozenset({"outpaint"}),
    "hires_scale": frozenset({"hires"}),
    "hires_upscaler": frozenset({"hires"}),
}


def _shown_in_id(axis: str, combo: dict[str, Any]) -> bool:
    if axis in _USED_BY:
        return combo["workflow"] in _USED_BY[axis]
    if axis in ("lora", "embedding"):
        return combo[axis] != "none"
    return True


def _id_part(axis: str, value: Any) -> str:
    if axis == "batch":
        return f"b{value}"
    if axis == "steps":
        return f"s{value}"
    if axis == "seed":
        return f"seed{value}"
    if axis == "guidance":
        return f"cfg{value:g}"
    if axis == "resolution":
        return f"{value[0]}x{value[1]}"
    if axis == "compile":
        return "eager" if value == "none" else f"compile-{value}"
    if axis == "fullgraph":
        return "fullgraph" if value else "graphbreaks"
    if axis == "channels_last":
        return "channels-last" if value else "contiguous"
    if axis == "offload" and value == "none":
        return "nooffload"
    if axis == "strength":
        return f"str{value:g}"
    if axis == "outpaint_px":
        return f"pad{value}"
    if axis == "hires_scale":
        return f"x{value:g}"
    if axis in ("lora", "embedding"):
        return f"{axis}-" + value.replace("zoo:", "")
    if axis in ("init_image", "mask"):
        return f"{axis.replace('_image', '')}-{Path(value).stem}"
    return str(value).replace("/", "_").replace(":", "_")


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
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        names = {field.name for field in fields(cls)}
        values = {key: value for key, value in data.items() if key in names}
        values["checks"] = tuple(values.get("checks", ()))
        return cls(**values)

    @property
    def denoise_steps(self) -> int:
        """Denoising steps one generation runs: img2img-like workflows run
        ``int(steps * strength)`` (the rule both backends follow), the hires fix a full first
        pass plus such a second pass. The ``steps`` of ``batch × steps / wall``."""
        partial = min(int(self.steps * self.strength), self.steps)
        if self.workflow in ("img2img", "inpaint", "outpaint"):
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


def _round8(value: float) -> int:
    return int(round(value / 8)) * 8


def _matches(combo: dict[str, Any], entry: dict[str, Any]) -> bool:
    return all(combo[key] == value for key, value in entry.items())


def _entry(model: Any) -> dict[str, Any]:
    return {key: value for key, value in model.model_dump().items() if value is not None}


def expand(scenario: Scenario) -> list[Cell]:
    """Expand the scenario's matrix into cells with readable, unique ids."""
    matrix = scenario.matrix
    axes = {name: list(getattr(matrix, name)) for name in AXES}
    combos = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    excludes = [_entry(entry) for entry in matrix.exclude]
    combos = [combo for combo in combos if not any(_matches(combo, e) for e in excludes)]
    for include in matrix.include:
        combos.append({name: values[0] for name, values in axes.items()} | _entry(include))

    unique: list[dict[str, Any]] = []
    for combo in combos:
        if combo not in unique:
            unique.append(combo)

    varying = [axis for axis in _ID_ORDER if len({repr(c[axis]) for c in unique}) > 1]
    shown = ["backend", *(axis for axis in varying if axis != "backend")]
    cells: list[Cell] = []
    seen: dict[str, int] = {}
    for combo in unique:
        base_id = "-".join(
            _id_part(axis, combo[axis]) for axis in shown if _shown_in_id(axis, combo)
        )
        seen[base_id] = seen.get(base_id, 0) + 1
        cell_id = base_id if seen[base_id] == 1 else f"{base_id}-{seen[base_id]}"
        width, height = combo.pop("resolution")
        cells.append(
            Cell(
                scenario=scenario.name,
                scenario_path=scenario.path,
                scenario_fingerprint=scenario.fingerprint(),
                id=cell_id,
                width=width,
                height=height,
                prompt=scenario.prompt,
                negative_prompt=scenario.negative_prompt,
                repeats=scenario.repeats,
                warmup=scenario.warmup,
                timeout_s=scenario.timeout_s,
                load_timeout_s=scenario.load_timeout_s,
                noise_limit=scenario.thresholds.noise,
                checks=tuple(scenario.checks),
                **combo,
            )
        )
    return cells


def group_by_load(cells: list[Cell]) -> list[list[Cell]]:
    """Groups of cells sharing a load key, in first-seen order, each group in cell order."""
    groups: dict[tuple[Any, ...], list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.load_key(), []).append(cell)
    return list(groups.values())
